"""Extractors: pretrained weights really load offline, frozen, gradients reach the images."""
import pytest
import skimage.data
import torch
from torch import nn
from torch.nn import functional as F

from d2sm_ext.extractors import (VGG19, FrozenBatchNorm, build_extractor, efficientnet_lite, freeze, vgg19)

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


def _bn_network():
    """Conv + BatchNorm2d (affine and not), BatchNorm1d, with running statistics that are not the
    defaults (a few training-mode passes)."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6, affine=False)), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(24, 10), nn.BatchNorm1d(10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
        net.train()
        for _ in range(3):
            net(torch.rand(4, 3, 12, 12) * 3)
    return net.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_frozen_batch_norm_matches_the_network_in_eval_mode(dtype):
    """freeze() replaces every BatchNorm by FrozenBatchNorm: bitwise the unfrozen network's
    eval-mode output, in float32 and after .to(bfloat16) / .double(); no _BatchNorm and no
    parameter left; the state dict keeps the running statistics under the same keys."""
    import copy

    net = _bn_network()
    frozen = freeze(copy.deepcopy(net))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert list(frozen.parameters()) == []
    stats_keys = {k for k in net.state_dict() if "running" in k or "num_batches" in k}
    assert stats_keys and stats_keys <= set(frozen.state_dict())
    frozen.train()  # freeze() must not let a mode switch reach the statistics
    img = torch.rand(5, 3, 12, 12)
    want = net.to(dtype)(img.to(dtype))
    got = frozen.to(dtype)(img.to(dtype))
    assert got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(frozen[1].running_mean, net[1].running_mean)  # no statistics update in train()
    # a layer frozen on its own is frozen too
    single = freeze(copy.deepcopy(net[1]))
    maps = torch.randn(2, 6, 3, 3).to(dtype)
    assert isinstance(single, FrozenBatchNorm) and torch.equal(single(maps), net[1](maps))


def test_d2sm_loss_survives_convert_sync_batchnorm():
    """A model holding a D2SMLoss whose extractor has BatchNorm layers: convert_sync_batchnorm
    converts the model's own BatchNorm and leaves the frozen extractor's alone; the loss is the
    same number before and after."""
    from d2sm_ext import D2SMLoss

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
            self.crit = D2SMLoss(extractor=_bn_network(), sampling="batch", queue_size=8)

    model = Model()
    clean, restored = torch.rand(4, 3, 12, 12), torch.rand(4, 3, 12, 12)
    before = model.crit(restored, clean)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted.net[1], nn.SyncBatchNorm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.crit.modules())
    converted.crit.queue.reset()
    model_after = converted.crit(restored, clean)
    torch.testing.assert_close(model_after, before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_d2sm_loss_with_a_queue_survives_module_casts(dtype):
    """.to(bfloat16) / .double() of a D2SMLoss with a queue (BatchNorm extractor): the loss runs,
    is finite and differentiable; the queue's kept sums stay float64."""
    from d2sm_ext import D2SMLoss

    crit = D2SMLoss(extractor=_bn_network(), sampling="batch", queue_size=8)
    crit(torch.rand(4, 3, 12, 12), torch.rand(4, 3, 12, 12))  # fills part of the queue
    crit = crit.to(dtype)
    assert crit.queue.stats.row_sums.dtype == torch.float64
    for _ in range(3):
        restored = torch.rand(4, 3, 12, 12, dtype=dtype, requires_grad=True)
        loss = crit(restored, torch.rand(4, 3, 12, 12, dtype=dtype))
        assert torch.isfinite(loss) and loss > 0
        (g,) = torch.autograd.grad(loss, restored)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert crit.queue.stats.row_sums.dtype == torch.float64
