"""The slow-link benchmark end to end: ``benchmarks/slowlink/run.sh --quick``.

It needs root, iproute2 and a kernel that lets us create network namespaces with tbf-shaped veth
links; elsewhere the test skips and says which of these is missing. Where it runs, it checks what
the benchmark's numbers rest on: the links really are shaped, the bytes each rank puts on the wire
match the collectives' arithmetic, every method trains, and no namespace of ours is left behind.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "slowlink" / "run.sh"
QUICK_METHODS = {"dense", "fp16", "powersgd-r1", "ef21-top1"}

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def unavailable() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces and shape links with tc"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} from iproute2 (apt-get install iproute2)"
    probe = subprocess.run(["bash", str(RUN), "--probe"], capture_output=True, text=True, timeout=60)
    return None if probe.returncode == 0 else probe.stderr.strip() or probe.stdout.strip()


def namespaces_of(pid: int) -> list[str]:
    """The namespaces of the run.sh with this pid (named ef21sl<pid>hub and ef21sl<pid>n<r>)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if re.fullmatch(rf"ef21sl{pid}(hub|n\d+)", n)]


def test_quick_run_over_shaped_links(tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    run = subprocess.Popen(["bash", str(RUN), "--quick", "--out", str(tmp_path), "--python", sys.executable],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.terminate()  # run.sh tears its namespaces down on TERM too
            run.wait(timeout=60)
    # Other runs (another test session) may have namespaces of their own at the same time: ours carry our pid.
    assert namespaces_of(run.pid) == [], "run.sh left network namespaces behind"
    assert run.returncode == 0, f"run.sh failed:\n{stdout[-4000:]}\n{stderr[-4000:]}"

    data = json.loads((tmp_path / "results-100mbit.json").read_text())
    world, params = data["world_size"], data["parameters"]
    assert world == 4

    # Shaping holds: a rank cannot push more than the tbf rate; 15% covers tbf's 64 KiB bucket, which
    # drains at line speed, on a 2 MB check. (Slower is possible on a loaded machine and is fine.)
    assert data["link_check"]["effective_mbit"] <= 1.15 * 100

    results = {r["method"]: r for r in data["results"]}
    assert set(results) == QUICK_METHODS
    for r in results.values():
        assert r["steps"] == 20
        assert r["accuracy"] > 0.3, f"{r['method']} did not train: {r['accuracy']:.2f} (chance is 0.1)"

    # Each rank's wire bytes per step match a ring allreduce, 2(n-1)/n of the fp32 gradients, plus
    # TCP/IP headers and acknowledgements: 1500-byte frames carry 1448 bytes of payload, so 4%, and
    # 10% leaves room for retransmissions.
    ring = 2 * (world - 1) / world * 4 * params
    dense = results["dense"]["wire_bytes"] / 20
    assert ring <= dense <= 1.10 * ring
    fp16 = results["fp16"]["wire_bytes"] / 20
    assert ring / 2 <= fp16 <= 1.10 * ring / 2
    # EF21 puts on the wire what its hook counts (its first step is a dense allreduce), plus headers.
    ef = results["ef21-top1"]
    assert ef["payload_bytes"] <= ef["wire_bytes"] <= 1.10 * ef["payload_bytes"]

    assert (tmp_path / "table.md").read_text().count("| ef21-top1 |") == 1
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0
