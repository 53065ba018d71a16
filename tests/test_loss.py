"""D2SMLoss end to end: every sampling mode trains a tiny net, gradients match finite differences."""
import pytest
import torch

from d2sm_ext import D2SMLoss
from loss_cases import tiny_denoiser, tiny_extractor


CONFIGS = {
    "internal": dict(sampling="internal", patch_size=8, stride=4),
    "pooled": dict(sampling="pooled", patch_size=8, stride=4, queue_size=16),
    "batch": dict(sampling="batch", queue_size=5),
}


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_two_training_steps_get_gradient_from_d2sm_alone(mode):
    crit = D2SMLoss(extractor=tiny_extractor(), **CONFIGS[mode])
    net = tiny_denoiser()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    assert list(crit.parameters()) == []
    clean = torch.rand(3, 3, 12, 12)
    for _ in range(2):
        noisy = clean + 0.1 * torch.randn_like(clean)
        restored = noisy + net(noisy)
        opt.zero_grad()
        l1 = (restored - clean).abs().mean()
        d2sm = crit(restored, clean)
        d2sm.backward(retain_graph=True)
        grads = [p.grad.abs().sum().item() for p in net.parameters()]
        assert all(g > 0 for g in grads), grads
        l1.backward()
        opt.step()
    if crit.queue is not None:
        per_step = 3 * (4 if mode == "pooled" else 1)
        assert len(crit.queue) == min(2 * per_step, crit.queue.size)


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_gradient_matches_finite_differences_in_float64(mode):
    crit = D2SMLoss(extractor=tiny_extractor(), **CONFIGS[mode]).double()
    if crit.queue is not None:  # a history so that memory rows take part
        crit.queue.enqueue(torch.randn(crit.queue.size, crit.queue.dim, dtype=torch.float64),
                           torch.randn(crit.queue.size, crit.queue.dim, dtype=torch.float64))
    crit.eval()  # evaluation never changes the queue, so repeated calls see the same history
    net = tiny_denoiser().double()
    clean = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    noisy = clean + 0.1 * torch.randn_like(clean)

    def loss():
        return crit(noisy + net(noisy), clean)

    params = list(net.parameters())
    grads = torch.autograd.grad(loss(), params)
    h = 1e-6
    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for idx in range(0, flat.numel(), max(1, flat.numel() // 5)):
            old = flat[idx].item()
            flat[idx] = old + h
            up = loss().item()
            flat[idx] = old - h
            down = loss().item()
            flat[idx] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - g.view(-1)[idx].item()) <= 1e-6 * max(1.0, abs(fd)), (mode, fd, g.view(-1)[idx].item())


def test_eval_mode_does_not_touch_queue_and_state_dict_carries_it():
    crit = D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=4)
    imgs = torch.rand(2, 3, 8, 8)
    crit.eval()
    crit(imgs, imgs)
    assert len(crit.queue) == 0
    crit.train()
    crit(imgs, imgs)
    assert len(crit.queue) == 2
    state = crit.state_dict()
    assert "queue.x_buffer" in state and not any(k.startswith("extractor.") for k in state)
    other = D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=4)
    other.load_state_dict(state)
    assert len(other.queue) == 2
    assert "queue_size=4" in repr(crit) and "sampling='batch'" in repr(crit)


def test_identical_images_give_zero_loss_and_errors():
    crit = D2SMLoss(extractor=tiny_extractor(), patch_size=8, stride=4)
    imgs = torch.rand(2, 3, 12, 12)
    assert crit(imgs, imgs.clone()).abs() < 1e-6
    with pytest.raises(ValueError, match="same shape"):
        crit(imgs, imgs[:1])
    with pytest.raises(ValueError, match="B×3×H×W"):
        crit(imgs[:, :1], imgs[:, :1])
    with pytest.raises(ValueError, match="queue needs one shared sample set"):
        D2SMLoss(extractor=tiny_extractor(), sampling="internal", queue_size=8)
    with pytest.raises(ValueError, match="sampling must be one of"):
        D2SMLoss(extractor=tiny_extractor(), sampling="global")


def test_default_loss_runs_with_pretrained_extractor():
    crit = D2SMLoss(patch_size=64, stride=32)
    clean = torch.rand(1, 3, 96, 96)
    restored = (clean + 0.2 * torch.randn_like(clean)).clamp(0, 1).requires_grad_(True)
    loss = crit(restored, clean)
    loss.backward()
    assert loss.item() > 0 and restored.grad.abs().sum() > 0
