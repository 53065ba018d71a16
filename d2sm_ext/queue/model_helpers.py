"""Helpers over a whole model that holds feature queues (a D2SMLoss inside the wrapped module, say):
the names DDP must leave alone, and the checkpoint of every sharded queue in one state dict.
Reached as ``d2sm_ext.distributed.<name>`` too (README "Distributed training")."""
from __future__ import annotations

import torch

from .ring import FeatureQueue


def queue_buffer_names(model: "torch.nn.Module") -> list[str]:
    """Names, relative to ``model``, of the buffers of every FeatureQueue inside it (the rows, the
    fill state and the kept statistics), as ``model.named_buffers()`` spells them."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, FeatureQueue):
            names += [name for name, _ in module.named_buffers(prefix=module_name)]
    return names


def ddp_ignore_queues(model: "torch.nn.Module") -> "torch.nn.Module":
    """Make ``DistributedDataParallel(model)`` leave every FeatureQueue inside ``model`` alone
    (a D2SMLoss held by the model included). Call it on the module you wrap, before wrapping;
    returns ``model``: ``DDP(ddp_ignore_queues(model))``.

    Why: DDP broadcasts every buffer of the wrapped module from rank 0 before each forward
    (``broadcast_buffers=True``, its default). A queue's buffers need none of it — the queue
    all-gathers each enqueued batch, so every rank already holds the same rows and sums — and
    the copy is pure cost (issue 21 measured q = 16384, d = 1280: 417 ms vs 192 ms per step)
    that would also hide a disagreement between ranks. DDP skips the names listed in the wrapped module's
    ``_ddp_params_and_buffers_to_ignore`` (set through
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, read once, when DDP
    is constructed, from the module it wraps); this adds the queues' buffer names to that list,
    keeping any names already there. Parameters and other buffers are synchronised as before.
    """
    from torch.nn.parallel import DistributedDataParallel

    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    names = existing + [n for n in queue_buffer_names(model) if n not in existing]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return model


def full_state_dict(model: "torch.nn.Module") -> dict:
    """``model.state_dict()`` with every sharded FeatureQueue's entries replaced by the whole
    queue's state (``FeatureQueue.full_state_dict``): a checkpoint that loads on any world size,
    or in one process. A collective: every rank calls it (then, typically, rank 0 saves it)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, FeatureQueue) and module.sharded:
            prefix = f"{name}." if name else ""
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
            state.update({prefix + k: v for k, v in module.full_state_dict().items()})
    return state
