"""Table and plot of the slow-link runs: ``python benchmarks/slowlink/report.py DIR [LINK ...]``.

Reads ``DIR/results-<link>.json`` (written by ``train.py``; every link in DIR unless named), writes ``DIR/table.md`` (one markdown
table per link) and ``DIR/accuracy_vs_time.png`` (test accuracy against training time, one line
per method, one panel per link), and prints the tables.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def load(directory: str, links: list[str]) -> list[dict]:
    names = [f"results-{link}.json" for link in links] or ["results-*.json"]
    paths = sorted(p for name in names for p in glob.glob(os.path.join(directory, name)))
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    if not runs:
        raise SystemExit(f"report.py: no results-*.json in {directory}")
    return sorted(runs, key=lambda r: r["args"]["rate_mbit"] or 0.0)


def mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}" if n < 1e8 else f"{n / 1e6:.0f}"


def time_to(curve: list, accuracy: float):
    """The first (step, seconds, wire bytes) at which the test accuracy reached ``accuracy``, or None."""
    return next(((step, t, sent) for step, t, sent, acc in curve if acc >= accuracy), None)


def table(run: dict) -> str:
    a = run["args"]
    check = run.get("link_check")
    lines = [f"**{a['link']}** per direction"
             + (f", {a['delay']} delay" if a.get("delay", "0") != "0" else ", no added delay")
             + f": {run['world_size']} nodes, MLP 64-{a['hidden']}-{a['hidden']}-10 "
             f"({run['parameters'] / 1e6:.2f}M parameters), batch {a['batch_size']}/rank, "
             f"target {100 * a['target']:.0f}% test accuracy, evaluated every {a['eval_every']} steps; "
             f"load average at the end {run['load_average'][0]:.1f}."]
    if check:
        lines[0] += (f" Link check: a {check['megabytes']:g} MB gloo allreduce took {check['seconds']:.3f} s "
                     f"(ideal {check['ideal_seconds']:.3f} s), {check['effective_mbit']:.0f} Mbit/s per rank "
                     "on the wire.")
    target = a["target"]
    early = round(target - 0.02, 4)  # a second, easier milestone read from the same curves
    lines += ["", f"| method | steps | time to {100 * early:.0f}% | time to {100 * target:.0f}% | vs dense | "
              "step = compute + comm (ms) | wire MB/rank/step | wire MB/rank to target | final acc |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense = next((r for r in run["results"] if r["method"] == "dense"), None)
    dense_t = time_to(dense["curve"], target) if dense else None
    for r in run["results"]:
        early_t, t = time_to(r["curve"], early), time_to(r["curve"], target)
        fmt = lambda x: "–" if x is None else f"{x[1]:.1f} s"  # noqa: E731
        vs = f"{dense_t[1] / t[1]:.1f}x" if t and dense_t else "–"
        to_target = mb(t[2]) if t and r["wire_bytes"] is not None else "–"
        per_step = None if r["wire_bytes"] is None else r["wire_bytes"] / r["steps"]
        lines.append(f"| {r['method']} | {r['steps']} | {fmt(early_t)} | {fmt(t)} | {vs} | "
                     f"{1e3 * r['step_seconds']:.0f} = {1e3 * r['compute_seconds']:.0f} + "
                     f"{1e3 * r['comm_seconds']:.0f} | {mb(per_step)} | {to_target} | "
                     f"{100 * r['accuracy']:.1f}% |")
    return "\n".join(lines)


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    colors = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(runs), figsize=(6.4 * len(runs), 4.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for i, r in enumerate(run["results"]):
            _, seconds, _, acc = zip(*r["curve"][1:])
            style = "-" if r["method"].startswith("ef21") else "--"
            ax.plot(seconds, [100 * x for x in acc], style, color=colors(i % 20), marker=".", markersize=3,
                    label=r["method"])
        ax.axhline(100 * run["args"]["target"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(80, 100)
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test accuracy (%)")
        delay = run["args"].get("delay", "0")
        ax.set_title(f"{run['world_size']} nodes, {run['args']['link']}" + (f" + {delay}" if delay != "0" else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n", 1)[1].strip())
    p.add_argument("dir", metavar="DIR", help="folder of the results-<link>.json; table and plot go here")
    p.add_argument("links", metavar="LINK", nargs="*",
                   help="links to report, e.g. 100mbit (default: every one in DIR)")
    args = p.parse_args(argv)
    runs = load(args.dir, args.links)
    text = "\n\n".join(table(r) for r in runs) + "\n"
    with open(os.path.join(args.dir, "table.md"), "w") as f:
        f.write(text)
    plot(runs, os.path.join(args.dir, "accuracy_vs_time.png"))
    print(text)
    print(f"saved {os.path.join(args.dir, 'table.md')} and {os.path.join(args.dir, 'accuracy_vs_time.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
