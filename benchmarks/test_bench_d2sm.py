"""pytest-benchmark suite (``make bench``; not collected by ``make test``).

Forward and forward+backward of every usable backend and of the baselines (eager reference,
torch.compile of the reference) on a few configurations per device. Calls are synchronised on
GPU; pytest-benchmark reports median and spread and saves JSON (--benchmark-json).
"""
import pytest
import torch

import d2sm_ext
from benchmarks.common import Config, float32_precision, make_inputs, runner, step_fn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = {
    "cpu": [Config("queue", 64, 1280, q=1984), Config("square mid-size", 4096, 512)],
    "cuda": [Config("queue", 64, 1280, q=4032), Config("target", 4096, 4096, tf32=True),
             Config("target", 4096, 4096, dtype=torch.bfloat16)],
}[DEVICE]


def _cases():
    """(config, backend) pairs that can run here: the baselines, and every registered backend
    that supports the device and the config's dtype (Triton's CPU interpreter excluded)."""
    cases = []
    for cfg in CONFIGS:
        names = ["reference", "reference+compile"]
        for name in d2sm_ext.available_backends():
            if name == "reference" or (name == "triton" and DEVICE == "cpu"):
                continue
            try:
                d2sm_ext.registry.resolve_backend(name, DEVICE, cfg.dtype)
            except ValueError:
                continue
            names.append(name)
        cases += [pytest.param(cfg, name, id=f"{cfg.label()}-{name}") for name in names]
    return cases


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("cfg,backend", _cases())
def test_d2sm(benchmark, cfg, backend, backward):
    with float32_precision(cfg.tf32):
        step = step_fn(runner(backend), make_inputs(cfg, DEVICE), backward)

        def synced():
            step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.extra_info.update(device=DEVICE, gflop=cfg.flops(backward) / 1e9, config=cfg.label())
        benchmark.pedantic(synced, rounds=5 if DEVICE == "cpu" else 20, warmup_rounds=1, iterations=1)
