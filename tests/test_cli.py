"""`d2sm demo` end to end with a tiny step count, and its argument errors."""
import json
import os
import subprocess
import sys

import pytest

from d2sm_ext.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [[], ["--sampling", "batch", "--queue-size", "16"]], ids=["internal", "queue"])
def test_demo_end_to_end_tiny(tmp_path, sampling):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "d2sm_ext", "demo", "--steps", "3", "--crop", "64", "--batch", "2",
         "--test-images", "1", "--out", str(out), "--no-progress"] + sampling,
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"L1", "L1+D2SM"}
    for run in report["results"].values():
        assert set(run) == {"15", "25", "50"}
        for r in run.values():
            assert 0 < r["psnr"] < 60 and 0 < r["ssim"] <= 1 and 0 <= r["agreement"] <= 1 and r["tiles"] > 0
    assert (out / "demo.png").stat().st_size > 10_000
    assert "| σ | run | PSNR (dB) |" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["demo", "--steps", "0"], "must be a positive integer"),
    (["demo", "--sigma", "300"], r"noise level is in \[0, 255\]"),
    (["demo", "--weight", "-1"], "weight must be >= 0"),
    (["demo", "--device", "tpu"], "invalid choice"),
    (["demo", "--crop", "32"], "--crop must be at least 64"),
    (["demo", "--queue-size", "8"], "--queue-size needs --sampling pooled or batch"),
    (["demo", "--sampling", "batch", "--batch", "2"], "needs --batch >= 3"),
    (["demo", "--sampling", "pooled", "--queue-size", "-1"], "--queue-size must be >= 0"),
    ([], "the following arguments are required: command"),
])
def test_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    import re
    assert re.search(message, capsys.readouterr().err)


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--steps", "--device", "--sigma", "--weight", "--out", "--seed"):
        assert opt in text


def test_demo_without_its_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "missing: tqdm" in err and "pip install 'd2sm_ext[demo]'" in err
