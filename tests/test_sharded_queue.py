"""A queue sharded across ranks (FeatureQueue(shard=True), D2SMLoss(shard_queue=True);
docs/DESIGN.md §3.7) against one process holding the whole queue, with real gloo processes
(tests/sharded_queue_worker.py): 200-step float64 streams on 2 and 3 ranks (uneven and empty
batches, wrap-around, zero and non-finite rows, kl/reverse_kl/symmetric_kl, both exclude_self,
"mean" and "sum", the fused CPU backend and the reference), the collectives' sizes, checkpoints
resumed on 3 ranks and in one process, and the loss inside a DDP-wrapped module."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sharded_queue_worker as worker
from d2sm_ext import D2SMLoss, FeatureQueue, d2sm_divergence
from loss_cases import tiny_extractor

# one xdist worker runs the whole file: its module-scoped process runs happen once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sharded_queue"),
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]
BACKENDS = ("cpu", "reference")
RTOL = 1e-9  # float64 streams: values and gradients against one process's whole queue


def _spawn(world, out, resume_from=None):
    mp.spawn(worker.run, args=(world, str(out / "init"), str(out), resume_from), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("sharded2"))


@pytest.fixture(scope="module")
def three(two, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded3")
    torch.save({b: two[0][f"full_{b}"] for b in BACKENDS}, out / "full_w2_step120.pt")
    return _spawn(3, out, resume_from=str(out / "full_w2_step120.pt"))


@pytest.fixture(params=[2, 3])
def runs(request, two, three):
    return two if request.param == 2 else three


# -- single process: construction and errors -------------------------------------------------------
def test_shard_needs_statistics():
    with pytest.raises(ValueError, match="statistics=True"):
        FeatureQueue(8, 3, shard=True)


def test_without_a_process_group_a_sharded_queue_is_the_whole_queue():
    q = FeatureQueue(8, 3, statistics=True, shard=True, dtype=torch.float64)
    assert not q.sharded and q.x_buffer.shape == (8, 3) and "x_buffer" in dict(q.named_buffers())
    x = torch.randn(5, 3, dtype=torch.float64)
    q.enqueue(x, x + 1)
    assert len(q) == 5 and torch.isfinite(d2sm_divergence(x, x + 1, queue=q))


def test_d2smloss_shard_queue_settings():
    with pytest.raises(ValueError, match="queue_size > 0"):
        D2SMLoss(extractor=tiny_extractor(), sampling="batch", shard_queue=True)
    with pytest.raises(ValueError, match="js"):
        D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=8, divergence="js", shard_queue=True)
    with pytest.raises(TypeError, match="shard_queue"):
        D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=8, shard_queue=1)


# -- 2 and 3 ranks ----------------------------------------------------------------------------------
def test_stream_equals_one_process_with_the_whole_queue(runs):
    for r in runs:
        for backend in BACKENDS:
            worst = r[f"worst_{backend}"]
            assert max(worst.values()) <= RTOL, (backend, worst)
            assert r[f"rows_equal_{backend}"]
            # kept sums: drift against an exact recomputation, and the collective refresh
            assert r[f"sums_error_{backend}"] <= RTOL and r[f"refresh_error_{backend}"] <= 1e-12


def test_value_identical_on_every_rank(runs):
    for backend in BACKENDS:
        values = [torch.stack(r[f"values_{backend}"]) for r in runs]
        assert len(values[0]) > 150
        for v in values[1:]:
            assert torch.equal(torch.isnan(v), torch.isnan(values[0]))
            assert torch.equal(v.nan_to_num(), values[0].nan_to_num())


def test_each_rank_stores_at_most_its_share(runs):
    world = len(runs)
    for backend in BACKENDS:
        stored = [r[f"stored_{backend}"] for r in runs]
        assert all(max(s) == min(s) <= math.ceil(worker.SIZE / world) for s in stored)
        assert sum(s[0] for s in stored) == worker.SIZE


def test_divergences_without_kept_statistics_and_per_row_values_raise(two):
    assert "js" in two[0]["error_{'divergence': 'js'}"] and "kl" in two[0]["error_{'divergence': 'js'}"]
    assert "mean" in two[0]["error_{'reduction': 'none'}"]


def test_no_collective_moves_a_queue_sized_tensor(two):
    for r in two:
        c = r["collectives"]
        assert c["filled"] == c["size"] and c["sizes"]
        bound = c["most_rows"] * (2 * c["dim"] + 2)  # the largest: the evicted rows and their norms
        assert max(c["sizes"]) <= bound < c["size"] * c["dim"] / 10


def test_full_state_dict_is_the_whole_queues_state(two):
    for backend in BACKENDS:
        full, whole = two[0][f"full_{backend}"], two[0][f"whole_at_120_{backend}"]
        assert set(full) == set(whole)
        for key in ("x_buffer", "y_buffer", "write_pointer", "filled", "stats.row_inv_norms"):
            assert torch.equal(full[key], whole[key]), key
        torch.testing.assert_close(full["stats.row_sums"], whole["stats.row_sums"], rtol=RTOL, atol=0)
        assert full["_extra_state"] == whole["_extra_state"]
        for r in two[1:]:  # the same on every rank
            assert all(torch.equal(v, r[f"full_{backend}"][k]) for k, v in full.items() if torch.is_tensor(v))


def test_full_state_from_two_ranks_resumes_on_three(three):
    for r in three:
        for backend in BACKENDS:
            assert max(r[f"resumed_worst_{backend}"].values()) <= RTOL
            assert r[f"rows_equal_resumed_{backend}"] and r[f"sums_error_resumed_{backend}"] <= RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("into_sharded", [False, True])
def test_full_state_from_two_ranks_resumes_in_one_process(two, backend, into_sharded):
    """Into a plain queue, or a shard=True queue without a process group: the stream continues
    exactly as the whole queue's does."""
    kwargs = dict(dtype=torch.float64, statistics=True, backend=backend)
    resumed = FeatureQueue(worker.SIZE, worker.DIM, shard=into_sharded, **kwargs)
    resumed.load_state_dict(two[0][f"full_{backend}"])
    whole = FeatureQueue(worker.SIZE, worker.DIM, **kwargs)
    whole.load_state_dict(two[0][f"whole_at_120_{backend}"])
    for step in range(120, 160):
        xs, ys = (torch.cat(t) for t in zip(*worker.batches(step, 2)))
        if xs.shape[0]:
            div, excl = worker.COMBOS[step % len(worker.COMBOS)]
            got = d2sm_divergence(xs, ys, div, exclude_self=excl, queue=resumed, backend=backend)
            want = d2sm_divergence(xs, ys, div, exclude_self=excl, queue=whole, backend=backend)
            torch.testing.assert_close(got, want, rtol=RTOL, atol=0, equal_nan=True)
        resumed.enqueue(xs, ys)
        whole.enqueue(xs, ys)
    assert torch.equal(resumed.x_buffer, whole.x_buffer)


def test_a_rank_shard_does_not_load_elsewhere(two):
    shard = two[0]["shard_state_cpu"]
    assert shard["x_buffer"].shape[0] == math.ceil(worker.SIZE / 2)
    with pytest.raises(ValueError, match="full_state_dict"):
        FeatureQueue(worker.SIZE, worker.DIM, dtype=torch.float64, statistics=True).load_state_dict(shard)


def test_the_training_loop_runs_from_an_empty_queue(two):
    """loss, backward, enqueue_last_batch from the first step (a new queue, and after reset() with a
    first batch larger than the queue): the loss leaves its batch pending on every rank, and the
    enqueue gives the rows and sums one process's whole queue gets from enqueue()."""
    for r in two:
        assert set(r["from_empty"]) == {f"{b}-{d}" for b in BACKENDS for d in ("float32", "float64")}
        for case, got in r["from_empty"].items():
            tol = RTOL if case.endswith("float64") else 1e-5
            assert got["raised"] == [""] * 4 and all(got["pending"]) and all(got["rows_equal"]), (case, got)
            assert got["value"] <= tol and got["grad_x"] <= tol, (case, got)
            assert got["sums_error"] <= (1e-12 if case.endswith("float64") else 1e-6), (case, got)


def test_public_methods_and_misuse_on_every_rank(two):
    for rank, r in enumerate(two):
        api = r["api"]
        assert api["len"] and api["memory"] and api["reset"] and api["deepcopy"] and api["same_rank_load"]
        assert "full_state_dict" in api["history_raises"]
        assert "distributed=False" in api["no_local_enqueue"]
        # the rows and sums are not buffers (DDP's broadcast cannot see them); the fill state is
        assert api["buffers"] == ["filled", "write_pointer"]
        assert "shard" in api["other_rank_load"] and "full_state_dict" in api["other_rank_load"]
        assert "24 slots" in api["size_mismatch"]
        # rank 1's rows are too wide: it raises its own error, rank 0 names rank 1
        assert ("memory rows must be (Q, d) matching x (2, 6)" in api["invalid_loss"]) if rank == 1 else \
            "rank(s) [1]" in api["invalid_loss"]
        assert ("(..., 5)" in api["invalid_enqueue"]) if rank == 1 else "rank(s) [1]" in api["invalid_enqueue"]
        assert api["all_empty"] <= RTOL
        assert api["cast"] is not False and api["cast"] <= 1e-12


def test_shard_requested_before_the_process_group(two):
    """(In the workers: built with shard=True before init_process_group, the first use raises.)"""
    assert "before the process group" in two[0]["late_group"]


# -- D2SMLoss(shard_queue=True) under DDP ------------------------------------------------------------
def test_ddp_gradients_equal_one_process(two):
    for r in two:
        assert len(r["grad_error"]) == worker.DDP_STEPS
        assert max(r["grad_error"]) <= 1e-5  # float32 features
        for got, want in r["losses"]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(two[0]["losses"], two[1]["losses"]):
        assert torch.equal(a[0], b[0])  # the same value on every rank


def test_ddp_buffer_broadcast_leaves_the_shards_alone(two):
    """broadcast_buffers=True (the default) and no ddp_ignore_queues: the ranks' shards still
    differ, and together they are the one-process queue."""
    for r in two:  # each rank's shard: its slots of the one-process queue, not rank 0's
        torch.testing.assert_close(r["shard_rows"], r["whole_rows_here"], rtol=1e-5, atol=1e-6)
    full, whole = two[0]["full"], two[0]["whole"]
    for key in ("write_pointer", "filled"):
        assert torch.equal(full[key], whole[key]), key
    for key in ("x_buffer", "y_buffer", "stats.row_sums"):  # float32 networks a few SGD steps apart
        torch.testing.assert_close(full[key], whole[key], rtol=1e-5, atol=1e-6)


def test_ddp_model_checkpoint_loads_in_one_process(two):
    model = worker.Holder(shard=False)
    model.load_state_dict(two[0]["model_state"])
    assert torch.equal(model.crit.queue.x_buffer, two[0]["full"]["x_buffer"])
    assert torch.equal(model.net[0].weight, two[0]["model_state"]["net.0.weight"])


def test_autocast_gradscaler_and_compile(two):
    for r in two:
        loss, scaled, plain, unscaled = r["autocast"]
        assert torch.isfinite(loss) and torch.equal(loss, scaled)
        torch.testing.assert_close(unscaled, plain, rtol=1e-6, atol=0)  # bf16: the scale is a power of two
        for compiled, eager, grad_diff in r["compiled"]:
            assert torch.equal(compiled, eager) and grad_diff == 0.0
    assert torch.equal(two[0]["autocast"][0], two[1]["autocast"][0])
