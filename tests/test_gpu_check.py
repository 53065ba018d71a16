"""benchmarks/gpu_check.sh, the one command a lent GPU runs (at most 10 minutes, no second try):
its stage limits fit the budget, pytest-xdist is declared where the script uses it, a stage that
hits its limit still leaves pytest's summary and junit log, and the whole script runs end to end
(--dry-run: the same stages at tiny sizes on CPU under the Triton interpreter)."""
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["env", "build", "tests", "queue", "bench", "profile", "extras"]  # by value: a cut run loses the tail
BUDGET_S = 480  # one 10-minute command, with room for the machine's start and the transfers

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def script(*args, env=None, timeout=300):
    full = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", SCRIPT, *args], env=full, capture_output=True, text=True, timeout=timeout)


def test_pytest_xdist_is_in_the_dev_extra_and_used_only_when_importable():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dev = tomllib.load(f)["project"]["optional-dependencies"]["dev"]
    assert any(re.match(r"pytest-xdist\b", d) for d in dev), dev
    text = open(SCRIPT).read()
    assert re.search(r'import xdist', text) and "-n " in text  # -n only after the import check


def test_stage_limits_fit_one_command():
    proc = script("--budget")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    limits = dict((name, int(v)) for name, v in re.findall(r"(\w+):(\d+)", proc.stdout.splitlines()[0]))
    assert list(limits) == STAGES
    grace = int(re.search(r"\+(\d+) s grace", proc.stdout).group(1))
    total = int(re.search(r"total (\d+) s", proc.stdout).group(1))
    assert total == sum(limits.values()) + grace * len(limits) <= BUDGET_S
    # every command of the script runs through run(), under its stage's limit: one `timeout` call
    text = open(SCRIPT).read()
    assert len(re.findall(r"^\s*timeout ", text, re.M)) == 1 and "timeout -s INT" in text
    assert not re.search(r"pytest[^\n]*\s-x\b", text)  # --maxfail, not the first failure
    # an override past the budget is refused before anything runs
    over = script("--budget", env={"BUILD_TIMEOUT": "400"})
    assert over.returncode == 2 and "over the 480 s budget" in over.stdout


@pytest.mark.slow
def test_a_stage_cut_by_its_limit_keeps_pytest_summary_and_junit_log(tmp_path):
    tests = tmp_path / "test_slow_stage.py"
    tests.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(120)\n")
    out = tmp_path / "out"
    proc = script("--dry-run", str(out), env={"GPU_CHECK_ONLY": "tests", "TEST_TIMEOUT": "6",
                                             "GPU_TESTS": str(tests), "GPU_TESTS_K": ""}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tests: TIME LIMIT (6 s) reached" in proc.stdout, proc.stdout
    log = (out / "tests.log").read_text()
    assert "KeyboardInterrupt" in log and "1 passed" in log, log  # SIGINT: pytest summarised
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) >= 1 and int(suite.get("failures")) == 0


@pytest.mark.slow
def test_dry_run_runs_every_stage_in_order(tmp_path):
    out = tmp_path / "out"
    proc = script("--dry-run", str(out), timeout=BUDGET_S)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    exits = re.findall(r"^(\w+) exit (\d+)$", proc.stdout, re.M)
    assert [name for name, _ in exits] == ["env", "build", "tests", "queue", "bench", "profile", "tune"], text
    assert all(rc == "0" for _, rc in exits), text
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) >= 1 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert "| 64 |" in (out / "queue_steps_cpu.md").read_text()
    bench = (out / "compare_cpu.md").read_text()
    assert "tiny: N=64+Q=16 d=32 fp32 | reference |" in bench and "scaling sweep" not in bench
    profile = (out / "profile_cpu.md").read_text()
    assert "## dense step, M=64 d=32 float32, backend dense" in profile and "## queue step" in profile
    assert "failed:" not in profile and re.search(r"aten op calls [1-9]", profile)
    assert re.search(r"^\| 32,32,32,1,1 \| [\d.]+ ms \| [\d.]+ ms \|$", (out / "tune.log").read_text(), re.M)
    assert proc.stdout.rstrip().endswith("done")
