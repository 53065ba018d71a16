"""D2SMLoss: images in, weighted D2SM divergence out — the module a training loop adds.

    crit = D2SMLoss()                              # EfficientNet-Lite0, internal patches, kl
    loss = l1(restored, clean) + crit(restored, clean)

Sampling (DESIGN §3):

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
concatenated batch (one extra all-gather of features per step). See d2sm_ext.distributed.

Scale and default weight: the divergence is averaged per row (see ``d2sm_ext.functional``); the
public code's number equals ours (reverse_kl, diagonal included) divided by M. ``weight``
multiplies the divergence. Measured in the demo (EfficientNet-Lite0, 9 patches of 48² per
crop): the kl term is ~3e-3–5e-3 while L1 on [0, 1] images falls from 0.1 to 0.03, so the
default 1.0 makes D2SM a ~10% regulariser; weight 10 let it dominate and cost 3–5 dB PSNR.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import distributed as dist_helpers
from .extractors import build_extractor
from .functional import d2sm_divergence
from .patches import extract_patches
from .queue import FeatureQueue
from .reference import DIVERGENCES

SAMPLINGS = ("internal", "pooled", "batch")


class D2SMLoss(nn.Module):
    """D2SM loss between restored and clean images (B×3×H×W, values in [0, 1])."""

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
    ):
        super().__init__()
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
        if queue_size > 0 and sampling == "internal":
            raise ValueError(
                "a queue needs one shared sample set: use sampling='pooled' or 'batch' with queue_size > 0 "
                "(internal sampling makes each image its own problem)"
            )
        self.extractor = build_extractor(extractor, weights=extractor_weights, layer=vgg_layer)
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
        if gather_live and sampling == "internal":
            raise ValueError("gather_live needs one shared sample set: sampling='pooled' or 'batch'")
        self.queue: Optional[FeatureQueue] = None
        if queue_size > 0:
            dim = feature_dim if feature_dim is not None else self._probe_feature_dim()
            self.queue = FeatureQueue(queue_size, dim)

    def _probe_feature_dim(self) -> int:
        side = self.patch_size if self.sampling == "pooled" else 224
        with torch.no_grad():
            ref = self.extractor.mean
            return self.extractor(torch.zeros(1, 3, side, side, dtype=ref.dtype, device=ref.device)).shape[1]

    def extra_repr(self) -> str:
        queue = self.queue.size if self.queue is not None else 0
        return (f"sampling={self.sampling!r}, patch_size={self.patch_size}, stride={self.stride}, "
                f"queue_size={queue}, divergence={self.divergence!r}, weight={self.weight}, "
                f"exclude_self={self.exclude_self}, eps={self.eps}, backend={self.backend!r}")

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P, d) patch features for internal/pooled sampling, (B, d) for batch sampling."""
        if self.sampling == "batch":
            return self.extractor(images)
        patches = extract_patches(images, self.patch_size, self.stride)
        b, p = patches.shape[:2]
        return self.extractor(patches.flatten(0, 1)).view(b, p, -1)

    def forward(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        for name, t in (("restored", restored), ("clean", clean)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[1] != 3:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a B×3×H×W image tensor, got {shape}")
        if restored.shape != clean.shape:
            raise ValueError(f"restored and clean must have the same shape, got {tuple(restored.shape)} "
                             f"and {tuple(clean.shape)}")
        fx = self._features(restored)
        with torch.no_grad():
            fy = self._features(clean)
        if self.sampling == "pooled":
            fx, fy = fx.flatten(0, 1), fy.flatten(0, 1)

        distributed = dist_helpers.resolve(self.distributed)
        local_fx, local_fy = fx, fy
        world = 1
        if distributed and self.gather_live:
            fx, world = dist_helpers.gather_live_rows(fx)
            fy, _ = dist_helpers.all_gather_rows(fy)
        x_mem = y_mem = None
        if self.queue is not None:
            x_mem, y_mem = self.queue.memory()  # the queue's dtype: d2sm_divergence promotes
            if x_mem.shape[0] == 0:
                x_mem = y_mem = None
        loss = d2sm_divergence(fx, fy, divergence=self.divergence, exclude_self=self.exclude_self,
                               reduction="mean", eps=self.eps, backend=self.backend,
                               x_memory=x_mem, y_memory=y_mem)
        if self.queue is not None and self.training:
            self.queue.enqueue(local_fx.detach().to(self.queue.x_buffer.dtype),
                               local_fy.to(self.queue.y_buffer.dtype), distributed=distributed)
        if world > 1:
            loss = dist_helpers.scale_local_gradient(loss, world)
        return self.weight * loss
