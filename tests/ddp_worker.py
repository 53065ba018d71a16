"""Worker for tests/test_distributed.py: one rank of a 2-process gloo group on CPU.

Each rank writes what the parent test compares into OUT/rank{r}.pt.
"""
import os

import torch
import torch.distributed as dist
from torch import nn

import loss_cases
from d2sm_ext import D2SMLoss, FeatureQueue
from loss_cases import tiny_denoiser


def tiny_extractor():
    return loss_cases.tiny_extractor(channels=6)


def images(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=g)


SHARDS = {0: (100, 3), 1: (101, 2)}  # uneven per-rank batches (seed, images)


def prefilled_loss(gather_live):
    crit = D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=8, gather_live=gather_live)
    g = torch.Generator().manual_seed(7)
    crit.queue.enqueue(torch.randn(5, crit.queue.dim, generator=g), torch.randn(5, crit.queue.dim, generator=g),
                       distributed=False)
    return crit


def run(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        # 1. queue: uneven batches, an empty batch, a non-finite row
        q = FeatureQueue(size=6, dim=2)
        if rank == 0:
            q.enqueue(torch.tensor([[0.0, 0], [1, 1], [2, 2]]), torch.zeros(3, 2))
            q.enqueue(torch.tensor([[5.0, 5]]), torch.zeros(1, 2))
        else:
            q.enqueue(torch.zeros(0, 2), torch.zeros(0, 2))
            q.enqueue(torch.tensor([[6.0, 6], [float("nan"), 0]]), torch.zeros(2, 2))
        result["queue"] = q.history()[0]
        # the same stream into a queue with statistics: identical sums on every rank
        qs = FeatureQueue(size=6, dim=2, statistics=True, dtype=torch.float64)
        if rank == 0:
            qs.enqueue(torch.tensor([[0.5, 0], [1, 1], [2, 2.5]], dtype=torch.float64), torch.ones(3, 2))
            qs.enqueue(torch.tensor([[5.0, 5]], dtype=torch.float64), torch.ones(1, 2))
        else:
            qs.enqueue(torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64))
            qs.enqueue(torch.tensor([[6.0, -6], [float("nan"), 0]], dtype=torch.float64), torch.ones(2, 2))
        result["stats_queue"] = (qs.x_buffer.clone(), qs.y_buffer.clone(), qs.stats.row_sums.clone())

        # 2. loss + DDP gradients, both semantics
        for gather_live in (False, True):
            net = nn.parallel.DistributedDataParallel(tiny_denoiser())
            crit = prefilled_loss(gather_live)
            seed, n = SHARDS[rank]
            clean = images(seed, n)
            noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + 50))
            loss = crit(noisy + net(noisy), clean)
            loss.backward()
            result[f"grads_{gather_live}"] = [p.grad.clone() for p in net.parameters()]
            result[f"loss_{gather_live}"] = loss.detach()
            result[f"queue_{gather_live}"] = crit.queue.history()[0]
            result[f"queue_sums_{gather_live}"] = crit.queue.stats.row_sums.clone()
            if rank == 0:
                result[f"state_{gather_live}"] = crit.state_dict()

        # 3. a DDP-wrapped denoiser trained 3 steps with L1 + D2SM
        net = nn.parallel.DistributedDataParallel(tiny_denoiser())
        crit = D2SMLoss(extractor=tiny_extractor(), sampling="pooled", patch_size=8, stride=4, queue_size=32)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        losses = []
        for step in range(3):
            clean = images(200 + 10 * step + rank, 2)
            noisy = clean + 0.1 * torch.randn_like(clean)
            restored = noisy + net(noisy)
            loss = (restored - clean).abs().mean() + crit(restored, clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        result["train_losses"] = losses
        result["train_queue"] = crit.queue.history()[0]
        result["train_params"] = [p.detach().clone() for p in net.parameters()]

        # 4. rank 1's batch is empty for two steps (pooled patches, a queue, both semantics):
        # every rank joins every collective, backward works, the queues stay identical
        for gather_live in (False, True):
            net = nn.parallel.DistributedDataParallel(tiny_denoiser())
            crit = D2SMLoss(extractor=tiny_extractor(), sampling="pooled", patch_size=8, stride=4, queue_size=32,
                            gather_live=gather_live)
            losses = []
            for step in range(2):
                clean = images(300 + step, 2 if rank == 0 else 0)
                restored = clean + net(clean)
                loss = crit(restored, clean)
                loss.backward()
                losses.append(loss.detach())
            result[f"empty_losses_{gather_live}"] = losses
            result[f"empty_grads_{gather_live}"] = [p.grad.clone() for p in net.parameters()]
            result[f"empty_queue_{gather_live}"] = crit.queue.history()[0]
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class LossInside(nn.Module):
    """A model that holds its D2SMLoss (with a queue keeping statistics) as an attribute, as a
    training module often does: DDP wraps both."""

    def __init__(self):
        super().__init__()
        self.net = tiny_denoiser()
        self.crit = D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=8)

    def forward(self, noisy, clean):
        restored = noisy + self.net(noisy)
        return (restored - clean).abs().mean() + self.crit(restored, clean), restored.detach()


QUEUE_STEPS = 4


def queue_batches(rank, step):
    clean = images(400 + 10 * step + rank, 2 + rank)  # uneven: 2 and 3 images
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(500 + step + rank))
    return noisy, clean


def run_queue_broadcast(rank, world, init_file, out):
    """The loss inside the DDP-wrapped module, ranks fed different batches. Records every tensor
    DDP broadcasts (at construction and before each forward), with and without
    d2sm_ext.distributed.ddp_ignore_queues, and the queue after the steps."""
    from d2sm_ext.distributed import ddp_ignore_queues, queue_buffer_names

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    broadcast = []
    original = dist._broadcast_coalesced

    def recording(group, tensors, *args, **kwargs):
        broadcast.extend(t.data_ptr() for t in tensors)
        return original(group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = recording
    try:
        result = {}
        for ignore in (True, False):
            model = LossInside()
            queue_ptrs = {b.data_ptr() for b in model.crit.queue.buffers()}
            names = queue_buffer_names(model)
            if ignore:
                ddp_ignore_queues(model)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            broadcast.clear()
            fed = []
            for step in range(QUEUE_STEPS):
                noisy, clean = queue_batches(rank, step)
                loss, restored = ddp(noisy, clean)
                opt.zero_grad()
                loss.backward()
                opt.step()
                fed.append((restored, clean))
            result[f"queue_broadcast_{ignore}"] = len(queue_ptrs & set(broadcast))
            result[f"other_broadcast_{ignore}"] = len(set(broadcast) - queue_ptrs)
            result[f"modules_buffers_{ignore}"] = len(queue_ptrs & {b.data_ptr() for b in ddp.modules_buffers})
            result[f"names_{ignore}"] = names
            q = model.crit.queue
            result[f"queue_{ignore}"] = (q.x_buffer.clone(), q.y_buffer.clone(), q.stats.row_sums.clone(),
                                         int(q.filled), int(q.write_pointer))
            result[f"fed_{ignore}"] = fed
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist._broadcast_coalesced = original
        dist.destroy_process_group()
