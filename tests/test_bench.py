"""scripts/bench_vs_trl.py runs end to end: every arm (kdrl, TRL with the teacher, the Prefect
flow, the floors) on a tiny shape, with TRL fed kdrl's prompts in kdrl's order (the script
checks the token ids itself and fails otherwise). Its numbers are not checked: speed targets
live in docs/benchmarks.md, measured on a quiet machine, never in tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_vs_trl_runs_every_arm_on_a_tiny_shape(tmp_path, embedded_cache):
    pytest.importorskip("trl")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"TMPDIR": str(tmp_path)}  # its scratch
    tiny = ["embedded.teacher_steps=3", "embedded.student_steps=3", "data.num_train=24", "data.num_heldout=4",
            f"run.cache_dir={embedded_cache}", "rollout.max_new_tokens=8"]
    argv = [sys.executable, "scripts/bench_vs_trl.py", "--shapes", "2x4", "--reps", "1", "--steps", "3",
            "--pairs", "kd"]
    for item in tiny:
        argv += ["--set", item]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    for arm in ("kdrl", "trl_kd", "flow_kdrl"):
        assert f"2x4 rep 0 {arm}: step " in out, out[-5000:]
    assert "| 2x4 | kdrl / trl_kd |" in out and "| 2x4 | flow_kdrl (Prefect) |" in out, out[-5000:]
    assert "kdrl step / own floor" in out, out[-5000:]
