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

# one xdist worker runs the whole file: its module-scoped process runs happen once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed"),
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


@pytest.fixture(scope="module")
def queue_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_queue")
    mp.spawn(ddp_worker.run_queue_broadcast, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ddp_never_broadcasts_the_queue_after_ddp_ignore_queues(queue_results):
    """A D2SMLoss held by the DDP-wrapped model: with ddp_ignore_queues no tensor DDP broadcasts
    (at construction or before a forward) is a queue buffer, and DDP's modules_buffers leaves
    them out; without it they are broadcast (the recording sees them), so the check can fail."""
    for r in queue_results:
        assert len(r["names_True"]) == 6 and all(n.startswith("crit.queue.") for n in r["names_True"])
        assert r["queue_broadcast_True"] == 0 and r["modules_buffers_True"] == 0
        assert r["other_broadcast_True"] > 0  # the recording works: the parameters were broadcast at construction
        assert r["queue_broadcast_False"] == 6 and r["modules_buffers_False"] == 6


@pytest.mark.parametrize("ignore", [True, False])
def test_ddp_queues_identical_and_equal_to_one_process(queue_results, ignore):
    """Ranks fed different (uneven) batches for 4 steps: the queues (rows, kept sums, fill state)
    are bitwise identical on both ranks, and equal those of one process fed the all-gathered
    stream (rank 0's rows, then rank 1's, each step)."""
    from d2sm_ext import D2SMLoss

    r0, r1 = queue_results
    for a, b in zip(r0[f"queue_{ignore}"], r1[f"queue_{ignore}"]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    single = D2SMLoss(extractor=ddp_worker.tiny_extractor(), sampling="batch", queue_size=8)
    for (restored0, clean0), (restored1, clean1) in zip(r0[f"fed_{ignore}"], r1[f"fed_{ignore}"]):
        single(torch.cat([restored0, restored1]), torch.cat([clean0, clean1]))
    x, y, sums, filled, pointer = r0[f"queue_{ignore}"]
    q = single.queue
    assert (int(q.filled), int(q.write_pointer)) == (filled, pointer) == (8, (4 * 5) % 8)
    torch.testing.assert_close(q.x_buffer, x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.y_buffer, y, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.stats.row_sums, sums, rtol=1e-6, atol=1e-9)
