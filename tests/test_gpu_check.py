"""benchmarks/gpu_check.py: its CPU path (toy sizes) runs every step without a failure, and a failing step is
reported as FAIL with its reason while the later steps still run, and the run exits non-zero."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_cpu_path_runs_every_step(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--size", "toy", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text()
    results = dict(re.findall(r"^\| ([\w-]+) \| (PASS|SKIP|FAIL) \|", table, flags=re.M))
    assert set(results) == set(gpu_check.STEPS), table
    assert "FAIL" not in results.values(), table
    if not torch.cuda.is_available():  # only the GPU-only tests skip
        assert results.pop("gpu-tests") == "SKIP"
        assert set(results.values()) == {"PASS"}, table
    for number in ("stage 1 bf16 speed-up over fp32", "stage 2 iteration / floor", "stage 2 peak memory"):
        assert number in table


def test_a_failing_step_is_reported_and_fails_the_run(tmp_path, capsys):
    def broken(check):
        raise ValueError("the kernel fell over\nsecond line of the message")

    def not_here(check):
        raise gpu_check.Skip("needs something this machine lacks")

    steps = {"first": lambda check: "fine", "broken": broken, "not-here": not_here, "after": lambda check: "ran"}
    threads = torch.get_num_threads()
    code = gpu_check.main(["--size", "toy", "--out", str(tmp_path / "check.md")], steps=steps)
    assert code == 1
    assert torch.get_num_threads() == threads  # restored for the tests that follow
    table = (tmp_path / "check.md").read_text()
    assert "| first | PASS |" in table and "| after | PASS |" in table  # the steps after a failure still run
    assert re.search(r"^\| broken \| FAIL \| [\d.]+ s \| ValueError: the kernel fell over \|$", table, flags=re.M)
    assert "| not-here | SKIP |" in table
    out = capsys.readouterr().out
    assert "== broken: FAIL" in out and "Traceback" in out

    # A real step failing: stage 1 on a missing folder fails, and 2D, which needs its distribution, says so.
    missing = tmp_path / "no-such-folder"
    code = gpu_check.main(["--out", str(tmp_path), "--only", "stage1,2d", "--images", str(missing)])
    assert code == 1
    table = (tmp_path / "gpu_check.md").read_text()
    assert re.search(r"^\| stage1 \| FAIL \| .*no-such-folder", table, flags=re.M), table
    assert re.search(r"^\| 2d \| FAIL \| .*needs the distribution", table, flags=re.M), table
