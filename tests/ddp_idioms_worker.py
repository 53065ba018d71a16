"""Worker for tests/test_ddp_idioms.py: one rank of a 2-process gloo group on CPU training the way
a framework does (PyTorch Lightning's idioms in plain PyTorch): the loss module an attribute of
the wrapped module, bf16 autocast ("bf16-mixed"), validation in eval mode under inference_mode, a
checkpoint written by rank 0 alone, and a resume on the same ranks. Writes OUT/rank{r}.pt."""
import os

import torch
import torch.distributed as dist
from torch import nn

from d2sm_ext import D2SMLoss
from d2sm_ext.distributed import ddp_ignore_queues
from ddp_worker import images, tiny_extractor
from loss_cases import tiny_denoiser


class Trainer(nn.Module):
    """A LightningModule's shape: the network and the loss (with its queue) as attributes."""

    def __init__(self):
        super().__init__()
        self.net = tiny_denoiser()
        self.crit = D2SMLoss(extractor=tiny_extractor(), sampling="pooled", patch_size=8, stride=4, queue_size=24,
                             gather_live=True)

    def forward(self, noisy, clean):
        restored = noisy + self.net(noisy)
        return (restored - clean).abs().mean() + self.crit(restored, clean)


def batch(step: int, rank: int):
    clean = images(400 + 10 * step + rank, 2 if rank == 0 else 1)  # uneven per-rank batches
    noise = 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(500 + 10 * step + rank))
    return clean + noise, clean


def train_step(ddp, opt, step, rank):
    noisy, clean = batch(step, rank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ddp(noisy, clean)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach().float()


def wrap(model):
    return nn.parallel.DistributedDataParallel(ddp_ignore_queues(model))  # broadcast_buffers=True


def run(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        model = Trainer()
        ddp = wrap(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        result["losses"] = [train_step(ddp, opt, step, rank) for step in range(3)]
        # validation as trainer.validate runs it: eval mode, inference_mode, no queue change
        model.eval()
        before = model.crit.queue.x_buffer.clone()
        with torch.inference_mode():
            result["val"] = ddp(*batch(99, rank)).float()
        result["val_queue_unchanged"] = torch.equal(before, model.crit.queue.x_buffer)
        model.train()
        ckpt = os.path.join(out, "ckpt.pt")
        if rank == 0:  # only rank 0 writes: state_dict() is no collective
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ckpt)
        result["queue_at_ckpt"] = model.crit.queue.history()
        dist.barrier()
        # the run goes on ...
        result["continued"] = train_step(ddp, opt, 3, rank)
        result["continued_params"] = [p.detach().clone() for p in model.parameters()]
        result["continued_sums"] = model.crit.queue.stats.row_sums.clone()
        # ... and the same step after a resume from the checkpoint on the same 2 ranks
        state = torch.load(ckpt, weights_only=False)
        resumed = Trainer()
        resumed.load_state_dict(state["model"])
        ddp2 = wrap(resumed)
        opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05)
        opt2.load_state_dict(state["opt"])
        result["resumed"] = train_step(ddp2, opt2, 3, rank)
        result["resumed_params"] = [p.detach().clone() for p in resumed.parameters()]
        result["resumed_sums"] = resumed.crit.queue.stats.row_sums.clone()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
