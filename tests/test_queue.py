"""FeatureQueue: FIFO order, wrap-around, oversize batches, non-finite rows, state, devices."""
import pytest
import torch

from d2sm_ext import FeatureQueue


def rows(start, n, dim=3):
    """Rows whose first feature is their global index, so order is visible."""
    r = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)
    return r, -r


def firsts(t):
    return t[:, 0].tolist()


def test_fill_then_wrap_with_batches_that_do_not_divide_size():
    q = FeatureQueue(size=7, dim=3)
    assert len(q) == 0
    x_mem, y_mem = q.history()
    assert x_mem.shape == (0, 3)
    q.enqueue(*rows(0, 3))
    assert len(q) == 3 and firsts(q.history()[0]) == [0, 1, 2]
    q.enqueue(*rows(3, 3))
    assert len(q) == 6 and firsts(q.history()[0]) == [0, 1, 2, 3, 4, 5]
    q.enqueue(*rows(6, 3))  # wraps: oldest two (0, 1) drop out
    hx, hy = q.history()
    assert len(q) == 7 and firsts(hx) == [2, 3, 4, 5, 6, 7, 8]
    assert firsts(hy) == [-2, -3, -4, -5, -6, -7, -8]  # pairs stay aligned
    q.enqueue(*rows(9, 5))
    assert firsts(q.history()[0]) == [7, 8, 9, 10, 11, 12, 13]
    # memory(): same rows, storage order, views (no copy)
    mx, _ = q.memory()
    assert sorted(firsts(mx)) == [7, 8, 9, 10, 11, 12, 13]
    assert mx.data_ptr() == q.x_buffer.data_ptr()


def test_oversize_batch_keeps_newest_rows():
    q = FeatureQueue(size=4, dim=3)
    q.enqueue(*rows(0, 1))
    q.enqueue(*rows(1, 10))
    assert firsts(q.history()[0]) == [7, 8, 9, 10]
    q.enqueue(*rows(11, 2))
    assert firsts(q.history()[0]) == [9, 10, 11, 12]


def test_non_finite_rows_never_enter_and_neighbours_are_kept():
    q = FeatureQueue(size=6, dim=3)
    x, y = rows(0, 5)
    x[1, 2] = float("nan")
    y[3, 0] = float("inf")
    q.enqueue(x, y)
    hx, hy = q.history()
    assert firsts(hx) == [0, 2, 4]
    assert torch.isfinite(hx).all() and torch.isfinite(hy).all()
    bad = torch.full((4, 3), float("nan"))
    q.enqueue(bad, bad)
    assert len(q) == 3
    q.enqueue(*rows(10, 4))
    assert firsts(q.history()[0]) == [2, 4, 10, 11, 12, 13]
    assert torch.isfinite(q.x_buffer).all()


def test_state_dict_round_trip_and_reset():
    q = FeatureQueue(size=5, dim=3)
    q.enqueue(*rows(0, 7))
    q2 = FeatureQueue(size=5, dim=3)
    q2.load_state_dict(q.state_dict())
    assert firsts(q2.history()[0]) == firsts(q.history()[0]) == [2, 3, 4, 5, 6]
    assert set(q.state_dict()) == {"x_buffer", "y_buffer", "write_pointer", "filled", "_extra_state"}
    assert q.state_dict()["_extra_state"] == {"statistics": False, "eps": 1e-8}
    q2.reset()
    assert len(q2) == 0 and q2.history()[0].shape == (0, 3)
    q2.enqueue(*rows(20, 1))
    assert firsts(q2.history()[0]) == [20]


def test_dtype_and_device_moves():
    q = FeatureQueue(size=4, dim=3)
    q.enqueue(*rows(0, 2))
    q = q.double()
    assert q.x_buffer.dtype == torch.float64 and q.write_pointer.dtype == torch.long
    q.enqueue(*[r.double() for r in rows(2, 1)])
    assert firsts(q.history()[0]) == [0, 1, 2]
    q = q.to("meta")
    assert q.x_buffer.device.type == "meta"


def test_enqueue_takes_no_graph_and_validates():
    q = FeatureQueue(size=4, dim=3)
    x = torch.randn(2, 3, requires_grad=True)
    q.enqueue(x * 2, x.detach())
    assert not q.x_buffer.requires_grad and q.x_buffer.grad_fn is None
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        q.enqueue(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="device"):
        q.enqueue(torch.randn(2, 3, device="meta"), torch.randn(2, 3, device="meta"))
    with pytest.raises(ValueError, match="positive int"):
        FeatureQueue(size=0, dim=3)


def test_enqueue_does_not_sync(monkeypatch):
    """No .item()/int()/bool() on a device tensor inside enqueue (they would sync on CUDA)."""
    q = FeatureQueue(size=5, dim=3)
    calls = []
    for name in ("item", "__int__", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    q.enqueue(*rows(0, 8))
    monkeypatch.undo()
    assert calls == []
    assert firsts(q.history()[0]) == [3, 4, 5, 6, 7]
