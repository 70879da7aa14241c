"""Helpers shared by the tests: devices to run on, and real multi-process runs on gloo."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def cpu_and_cuda() -> list[str]:
    """Devices to parametrize over: the CPU always, CUDA when one is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world_size: int, port: int, outdir: str, collective_timeout: float, args) -> None:
    # 1 thread per rank: several ranks share the machine's few cores.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=collective_timeout))
        try:
            payload = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        payload = ("error", traceback.format_exc())
    try:
        data = pickle.dumps(payload[1], protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        payload = ("error", "the return value could not be pickled:\n" + traceback.format_exc())
        data = pickle.dumps(payload[1])
    tmp = os.path.join(outdir, f"{rank}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    # Renamed when complete, so the parent never reads half a file; the suffix says how it ended.
    os.replace(tmp, os.path.join(outdir, f"{rank}.{payload[0]}"))
    os._exit(0)  # the result is on disk; skip the interpreter's slow teardown of torch


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0,
                    collective_timeout: float = 60.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in a gloo group.

    Returns every rank's return value (pickled back), by rank. If any rank raises, the others are
    stopped and a ``RuntimeError`` carries each failed rank's traceback; past ``timeout`` seconds
    every rank is stopped. ``fn`` must be importable (defined at module level).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ef21-dist-") as outdir:
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, r, world_size, port, outdir, collective_timeout, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()

        def ended(r, how):
            return os.path.exists(os.path.join(outdir, f"{r}.{how}"))

        deadline = time.monotonic() + timeout
        failed_at = None
        timed_out = False
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) or ended(r, "error")
                                         for r, p in enumerate(procs)):
                failed_at = now  # the other ranks may be blocked in a collective: a short grace, then stop
            if (failed_at is not None and now - failed_at > 2.0) or now > deadline:
                timed_out = failed_at is None
                break
            time.sleep(0.02)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()

        results, errors = [], []
        for r, p in enumerate(procs):
            how = "ok" if ended(r, "ok") else "error" if ended(r, "error") else None
            if how is None:
                why = (f"timed out after {timeout:.0f} s" if timed_out else
                       f"exited with code {p.exitcode}" if p.exitcode not in (None, 0, -9) else
                       "stopped after another rank failed")
                errors.append(f"--- rank {r}: {why}")
                results.append(None)
                continue
            with open(os.path.join(outdir, f"{r}.{how}"), "rb") as f:
                value = pickle.load(f)
            if how == "error":
                errors.append(f"--- rank {r} raised:\n{value}")
            results.append(value)
        if errors:
            raise RuntimeError(f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) "
                               "failed:\n" + "\n".join(errors))
        return results


class Refusals(dict):
    """The message of each attempt that raised ValueError or RuntimeError, by name: a rank collects
    what it refused and returns it, so the test can read every rank's words."""

    def attempt(self, what, fn) -> None:
        try:
            fn()
        except (ValueError, RuntimeError) as e:
            self[what] = str(e)
