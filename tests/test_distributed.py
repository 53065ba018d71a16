"""FeatureQueue and D2SMLoss under torch.distributed: 2 real processes, gloo, CPU.

Equivalence (what "the same as single-process" means here):
* default (gather_live=False): each rank's loss is D2SM(its batch, shared history); DDP averages
  the gradients, so the parameters' gradient equals that of the single-process mean of the
  per-rank losses, computed with the same history.
* gather_live=True: the gradient equals that of the single-process loss on the concatenated
  batch (rank 0's images, then rank 1's) with the same history.
The queue after a step holds the same rows on every rank: the all-gathered batch, rank order.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_worker

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    init_file = out / "init"  # file:// rendezvous: no ports
    mp.spawn(ddp_worker.run, args=(2, str(init_file), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_queue_gathers_uneven_empty_and_nonfinite_batches(results):
    want = torch.tensor([[0.0, 0], [1, 1], [2, 2], [5, 5], [6, 6]])
    for r in results:
        torch.testing.assert_close(r["queue"], want)


def test_queue_statistics_identical_on_every_rank_and_equal_to_one_process(results):
    """The all-gathered batches enter every rank's queue, so the kept sums are identical (bit for
    bit) and equal those of one process fed the gathered stream."""
    from d2sm_ext import FeatureQueue

    x0, y0, s0 = results[0]["stats_queue"]
    for r in results[1:]:
        x, y, s = r["stats_queue"]
        assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(s, s0)
    single = FeatureQueue(size=6, dim=2, statistics=True, dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    single.enqueue(torch.tensor([[0.5, 0], [1, 1], [2, 2.5]], **f64), torch.ones(3, 2, **f64))  # step 1: rank 0, rank 1 (empty)
    single.enqueue(torch.tensor([[5.0, 5], [6, -6], [float("nan"), 0]], **f64), torch.ones(3, 2, **f64))  # step 2
    torch.testing.assert_close(single.stats.row_sums, s0, rtol=1e-12, atol=1e-12)


def _single_process(gather_live):
    net = ddp_worker.tiny_denoiser()
    crit = ddp_worker.prefilled_loss(gather_live).eval()  # eval: the history stays fixed
    batches = []
    for rank in (0, 1):
        seed, n = ddp_worker.SHARDS[rank]
        clean = ddp_worker.images(seed, n)
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + 50))
        batches.append((noisy, clean))
    if gather_live:
        noisy = torch.cat([b[0] for b in batches])
        clean = torch.cat([b[1] for b in batches])
        loss = crit(noisy + net(noisy), clean)
    else:
        loss = sum(crit(n + net(n), c) for n, c in batches) / 2
    loss.backward()
    return loss.detach(), [p.grad for p in net.parameters()], crit


@pytest.mark.parametrize("gather_live", [False, True])
def test_ddp_gradients_equal_single_process(results, gather_live):
    want_loss, want_grads, crit = _single_process(gather_live)
    for r in results:
        for got, want in zip(r[f"grads_{gather_live}"], want_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if gather_live:  # every rank reports the loss of the whole batch
        for r in results:
            torch.testing.assert_close(r["loss_True"], want_loss)
    else:  # the mean of the per-rank losses
        torch.testing.assert_close((results[0]["loss_False"] + results[1]["loss_False"]) / 2, want_loss)
    # queues identical on both ranks: history + the gathered batch, and the same kept statistics
    torch.testing.assert_close(results[0][f"queue_{gather_live}"], results[1][f"queue_{gather_live}"])
    assert torch.equal(results[0][f"queue_sums_{gather_live}"], results[1][f"queue_sums_{gather_live}"])
    assert results[0][f"queue_{gather_live}"].shape[0] == 8  # 5 prefilled + 5 images, size 8
    # a rank-0 checkpoint loads into a single-process loss (any world size)
    crit.load_state_dict(results[0][f"state_{gather_live}"])
    torch.testing.assert_close(crit.queue.history()[0], results[1][f"queue_{gather_live}"])


def test_ddp_training_three_steps(results):
    for r in results:
        assert len(r["train_losses"]) == 3 and all(torch.isfinite(torch.tensor(r["train_losses"])))
    torch.testing.assert_close(results[0]["train_queue"], results[1]["train_queue"])
    assert results[0]["train_queue"].shape[0] == min(3 * 2 * 2 * 4, 32)  # steps × ranks × images × patches, size 32
    for a, b in zip(results[0]["train_params"], results[1]["train_params"]):
        torch.testing.assert_close(a, b)  # DDP kept the replicas in sync


@pytest.mark.parametrize("gather_live", [False, True])
def test_empty_batch_on_one_rank(results, gather_live):
    """Rank 1 has no images for two steps: nothing hangs, every loss is finite, the gradients
    agree across ranks (DDP averaged them), and both queues hold rank 0's patches (2 steps ×
    2 images × 4 patches). With gather_live rank 1 sees rank 0's live rows, so both ranks report
    the same loss. Without it, rank 1 has no rows at step 0 (loss 0) and only the queue at step 1
    (a constant: the queue rows' own divergence)."""
    r0, r1 = results[0], results[1]
    for r in results:
        assert all(torch.isfinite(v) for v in r[f"empty_losses_{gather_live}"])
    if gather_live:
        for step in (0, 1):
            torch.testing.assert_close(r0["empty_losses_True"][step], r1["empty_losses_True"][step])
    else:
        assert r1["empty_losses_False"][0] == 0 and r1["empty_losses_False"][1] > 0
    for a, b in zip(r0[f"empty_grads_{gather_live}"], r1[f"empty_grads_{gather_live}"]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(r0[f"empty_queue_{gather_live}"], r1[f"empty_queue_{gather_live}"])
    assert r0[f"empty_queue_{gather_live}"].shape[0] == 16
