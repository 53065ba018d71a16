"""Extractors: pretrained weights really load offline, frozen, gradients reach the images."""
import pytest
import skimage.data
import torch
from torch import nn
from torch.nn import functional as F

from d2sm_ext.extractors import (VGG19, build_extractor, efficientnet_lite, freeze, vgg19)

CAT_CLASSES = range(281, 286)  # ImageNet's domestic-cat classes


@pytest.fixture(scope="module")
def chelsea():
    img = torch.tensor(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)


def test_efficientnet_lite0_classifies_chelsea_as_a_cat(chelsea):
    net = freeze(efficientnet_lite(0, with_classifier=True))
    wrapped = build_extractor(net)  # ImageNet normalisation, as for the feature extractor
    top = wrapped(chelsea).argmax(1).item()
    assert top in CAT_CLASSES


def test_default_extractor_features_frozen_and_differentiable(chelsea):
    ext = build_extractor("efficientnet_lite0")
    assert list(ext.parameters()) == []  # nothing can reach an optimizer
    ext.train()
    assert not ext.training and not any(m.training for m in ext.modules())
    img = chelsea.clone().requires_grad_(True)
    feats = ext(img)
    assert feats.shape == (1, 1280)
    feats.pow(2).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert all(b.grad is None for b in ext.buffers())


def test_vgg19_from_path_and_layers(tmp_path):
    path = tmp_path / "vgg19.pth"
    torch.save(VGG19().state_dict(), path)
    fc7 = build_extractor("vgg19", weights=str(path))
    assert fc7(torch.rand(2, 3, 64, 64)).shape == (2, 4096)
    conv = vgg19(str(path), layer="conv5_4")
    assert conv(torch.rand(1, 3, 224, 224)).shape == (1, 100352)


def test_vgg19_missing_weights_explain_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V1.*efficientnet_lite0"):
        build_extractor("vgg19", weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="layer must be one of"):
        vgg19(str(tmp_path / "absent.pth"), layer="fc8")


def test_custom_module_and_unknown_name():
    ext = build_extractor(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)))
    assert ext(torch.rand(2, 3, 16, 16)).shape == (2, 4) and list(ext.parameters()) == []
    with pytest.raises(ValueError, match="extractor must be one of"):
        build_extractor("resnet")
    with pytest.raises(ValueError, match="B×3×H×W"):
        ext(torch.rand(2, 1, 16, 16))
