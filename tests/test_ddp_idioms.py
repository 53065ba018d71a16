"""A training framework's idioms with D2SMLoss and a statistics queue under 2 real gloo ranks, in
plain PyTorch (no framework dependency in the test extras; tests/ddp_idioms_worker.py): the loss
held by the DDP-wrapped module (its queue excluded from the buffer broadcast), bf16 autocast,
validation under inference_mode, a rank-0 checkpoint resumed on 2 ranks and on 1."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_idioms_worker

# one xdist worker runs the whole file: its module-scoped process runs happen once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp_idioms"),
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_idioms")
    mp.spawn(ddp_idioms_worker.run, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_training_validation_and_identical_queues(run):
    _, results = run
    for r in results:
        assert all(torch.isfinite(v) for v in r["losses"]) and torch.isfinite(r["val"])
        assert r["val_queue_unchanged"]  # evaluation never changes the queue
    # the queues hold the same rows and sums on every rank (each enqueue is all-gathered)
    for i in range(2):
        assert torch.equal(results[0]["queue_at_ckpt"][i], results[1]["queue_at_ckpt"][i])
    assert torch.equal(results[0]["continued_sums"], results[1]["continued_sums"])


def test_resume_on_two_ranks_continues_exactly(run):
    _, results = run
    for r in results:
        assert torch.equal(r["resumed"], r["continued"])
        for p, q in zip(r["resumed_params"], r["continued_params"]):
            assert torch.equal(p, q)
        assert torch.equal(r["resumed_sums"], r["continued_sums"])


def test_resume_on_one_rank(run):
    """The rank-0 checkpoint loads in a single process: the same queue, exact kept sums."""
    out, results = run
    state = torch.load(out / "ckpt.pt", weights_only=False)
    model = ddp_idioms_worker.Trainer()
    model.load_state_dict(state["model"])
    queue = model.crit.queue
    for i in range(2):
        assert torch.equal(queue.history()[i], results[0]["queue_at_ckpt"][i])
    kept = queue.stats.row_sums.clone()
    queue.refresh_statistics()
    torch.testing.assert_close(kept, queue.stats.row_sums, rtol=1e-5, atol=1e-7)
    noisy, clean = ddp_idioms_worker.batch(3, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(noisy, clean)
    loss.backward()
    assert torch.isfinite(loss) and model.net[0].weight.grad is not None
