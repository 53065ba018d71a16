"""Patch sampling: counts, positions (border policy), order, gradients."""
import pytest
import torch

from d2sm_ext import extract_patches, patch_grid
from d2sm_ext.patches import window_origins


@pytest.mark.parametrize("length,k,s,expected", [
    (512, 224, 56, [0, 56, 112, 168, 224, 280, 288]),   # border-aligned last window
    (448, 224, 56, [0, 56, 112, 168, 224]),             # exact fit: no extra window
    (224, 224, 56, [0]),
    (10, 4, 3, [0, 3, 6]),
    (11, 4, 3, [0, 3, 6, 7]),
])
def test_window_origins(length, k, s, expected):
    assert window_origins(length, k, s) == expected


def test_counts_positions_and_order():
    b, h, w, k, s = 2, 11, 10, 4, 3
    img = torch.arange(b * 3 * h * w, dtype=torch.float32).view(b, 3, h, w)
    p = extract_patches(img, k, s)
    rows, cols = window_origins(h, k, s), window_origins(w, k, s)
    assert patch_grid(h, w, k, s) == (4, 3)
    assert p.shape == (b, 12, 3, k, k)
    n = 0
    for r in rows:          # row-major over windows, image-major outside
        for c in cols:
            for bi in range(b):
                torch.testing.assert_close(p[bi, n], img[bi, :, r:r + k, c:c + k])
            n += 1


def test_every_pixel_covered():
    img = torch.zeros(1, 3, 37, 50)
    p = extract_patches(img.requires_grad_(), 16, 7)
    p.sum().backward()
    assert (img.grad > 0).all()


def test_gradient_through_unfolding():
    img = torch.randn(1, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: extract_patches(t, 5, 3).pow(2).sum(dim=(2, 3, 4)), (img,))


def test_errors():
    with pytest.raises(ValueError, match="smaller than patch_size 224"):
        extract_patches(torch.zeros(1, 3, 100, 300))
    with pytest.raises(ValueError, match="B×C×H×W"):
        extract_patches(torch.zeros(3, 100, 300))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        extract_patches(torch.zeros(1, 3, 10, 10), 4, 0)
