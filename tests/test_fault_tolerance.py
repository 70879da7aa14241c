"""A rank that dies mid-training, under torchrun --max-restarts: examples/train_resumable.py.

Two jobs of 2 ranks each, launched with ``python -m torch.distributed.run --standalone
--max-restarts 1``: one where rank 1 exits (os._exit) at step 25, once, and one without a crash.
Both checkpoint every 10 steps; the crashed job restarts from step 20. Their final parameters
must agree to 1e-6 (the same operations on the same values: in practice bitwise), and neither job
may take longer than the test's timeout (a job that hung would).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_resumable.py"
STEPS, EVERY, CRASH_AT = 30, 10, 25
TIMEOUT_S = 420  # both jobs together, including one restart; the collective timeout is 30 s


def launch(tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", str(EXAMPLE),
           "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--ckpt-dir", str(tmp / name),
           "--out", str(tmp / f"{name}.pt"), "--timeout", "30", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def test_crashed_rank_restarts_from_checkpoint_and_matches(tmp_path):
    jobs = {"crashed": launch(tmp_path, "crashed", "--crash-at", str(CRASH_AT)),
            "clean": launch(tmp_path, "clean")}
    try:
        for name, job in jobs.items():
            job.wait(timeout=TIMEOUT_S)
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in jobs}
    for name, job in jobs.items():
        assert job.returncode == 0, f"{name} job failed:\n{logs[name][-4000:]}"
    assert (tmp_path / "crashed" / "crashed").exists(), "rank 1 never crashed"
    assert f"resumed from step {CRASH_AT // EVERY * EVERY}" in logs["crashed"], logs["crashed"][-4000:]
    assert "resumed" not in logs["clean"]
    crashed = torch.load(tmp_path / "crashed.pt")
    clean = torch.load(tmp_path / "clean.pt")
    assert crashed.keys() == clean.keys()
    for n in clean:
        torch.testing.assert_close(crashed[n], clean[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
