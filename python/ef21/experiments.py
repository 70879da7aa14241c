r"""The EF21 paper's logistic-regression experiment, run through the DDP hook.

Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically
Faster Error Feedback" (NeurIPS 2021, arXiv:2106.05203), experiments: logistic regression with a
nonconvex regulariser on LibSVM data,

    f(x) = (1/N) sum_j log(1 + exp(-y_j a_j^T x)) + lambda sum_i x_i^2 / (1 + x_i^2),  lambda = 0.1,

split over n = 20 workers, each holding a contiguous block of the rows in file order, with full
local gradients and plain gradient steps. Here every worker is a real process and a DDP rank on
gloo, the model is a single float64 parameter vector (one DDP bucket = one compression unit), and
the compressed communication is :func:`ef21.register`'s C++ hook. Per run:

1. rank ``i`` holds rows ``[i*m, (i+1)*m)`` (``m = N // n``, the remainder goes to the last rank)
   and minimises ``F_i(x) = (n m_i / N) * mean_block log(1 + exp(-y a^T x)) + lambda R(x)``; the
   weight ``n m_i / N`` makes DDP's average over ranks exactly ``f``, also for the larger last
   block (the paper's code weighs the blocks equally; they differ by at most n-1 rows);
2. ``x^0`` is drawn from N(0, I) with ``--seed`` and is the same for every method;
3. each step: local gradient by autograd, the hook (EF21, EF, EF21-SGDM, plain Top-k, dense)
   turns the ranks' gradients into one direction, ``torch.optim.SGD`` steps with
   ``lr = factor * gamma``, ``gamma = 1 / (L + L~ sqrt(beta/theta))`` (EF21's theory step for
   Top-k, alpha = k/d, theta = 1 - sqrt(1-alpha), beta = (1-alpha)/theta, L = lambda_max(X^T X /
   (4N)) + 2 lambda, L~ = sqrt(mean_i L_i^2), L_i the same for F_i); dense uses ``factor / L``;
4. EF21 starts as the paper's code does, ``g_i^0 = grad f_i(x^0)`` (``init="full"``, one dense
   step that the paper's x-axis does not count); EF starts with ``e_i^0 = 0``;
5. recorded every step: ``||grad f(x_t)||^2`` and ``f(x_t)`` (each rank keeps its local gradient
   and loss, summed over ranks once at the end of the run), the paper's x-axis ``32 k t`` bits per
   worker, and the bytes the hook really sent from rank 0 (float64 values and int32 indices).

``python -m ef21.experiments`` runs all four data sets at the paper's Top-k (a9a Top-4, mushrooms
Top-2, phishing Top-1, w8a Top-1), writes one CSV per run, the plots and a summary table; see
``--help`` and docs/paper_reproduction.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ef21
from ef21 import libsvm

LAMBDA = 0.1
BITS_PER_VALUE = 32  # the paper's x-axis counts 32 bits per value sent (indices not counted)
TOP_K = {"a9a": 4, "mushrooms": 2, "phishing": 1, "w8a": 1}  # the paper's settings
# Multiples of the theory step for EF21 and EF. 1x, the slowest for both, is left out of the
# default to fit the time budget (--factors 1,4,16,64 adds it).
FACTORS = (4, 16, 64)
# Iterations per data set for the default run, sized so that all four data sets, 20 ranks and
# every method take about 20 minutes on 2 shared CPU cores, where one step of 20 ranks costs
# about 60 ms (see docs/paper_reproduction.md).
STEPS = {"a9a": 600, "mushrooms": 500, "phishing": 500, "w8a": 500}
# The step multiple at which plain Top-k and EF21-SGDM run: the one the paper shows EF21 at
# (a9a, phishing, w8a); for mushrooms EF21's best of the default sweep.
REFERENCE_FACTOR = {"a9a": 64, "mushrooms": 64, "phishing": 16, "w8a": 64}
METHODS = ("ef21", "ef", "ef21-sgdm", "plain", "dense")


# -- the problem ------------------------------------------------------------------------------


def split(num_rows: int, n: int) -> list[tuple[int, int]]:
    """Row ranges of ``n`` contiguous blocks in file order: ``num_rows // n`` rows each, the
    remainder to the last block."""
    if num_rows < n:
        raise ValueError(f"cannot split {num_rows} rows over {n} workers")
    m = num_rows // n
    return [(i * m, (i + 1) * m if i < n - 1 else num_rows) for i in range(n)]


def local_objective(x: torch.Tensor, margins: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * mean log(1 + exp(-y * margins)) + lambda * sum x^2 / (1 + x^2)``.

    ``logaddexp(0, z)`` is log(1 + e^z) without overflow and without softplus's linear cut-off
    above z = 20, which would perturb gradients at the 1e-9 level the experiment reaches below.
    """
    z = -y * margins
    return weight * torch.logaddexp(torch.zeros_like(z), z).mean() + LAMBDA * (x * x / (1 + x * x)).sum()


def full_gradient(x: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``grad f(x)`` of the whole data set, in closed form (an independent check of the runs)."""
    s = -y * torch.sigmoid(-y * (X @ x))
    return X.T @ s / X.shape[0] + LAMBDA * 2 * x / (1 + x * x) ** 2


def smoothness(A: torch.Tensor, weight: float = 1.0) -> float:
    """``weight * lambda_max(A^T A / (4 m)) + 2 lambda``: the logistic loss has curvature at most
    1/4 per sample and the regulariser x^2/(1+x^2) at most 2 (at x = 0)."""
    return weight * torch.linalg.eigvalsh(A.T @ A / (4 * A.shape[0]))[-1].item() + 2 * LAMBDA


def theory_step(L: float, L_tilde: float, k: int, d: int) -> float:
    """EF21's step for Top-k: ``1 / (L + L~ sqrt(beta/theta))`` with alpha = k/d; 1/L when k = d."""
    alpha = k / d
    if alpha >= 1:
        return 1 / L
    theta = 1 - math.sqrt(1 - alpha)
    beta = (1 - alpha) / theta
    return 1 / (L + L_tilde * math.sqrt(beta / theta))


@dataclass
class Problem:
    """One data set split over ``n`` workers, with its smoothness constants and ``x^0``."""

    name: str
    X: torch.Tensor
    y: torch.Tensor
    n: int
    k: int
    blocks: list[tuple[int, int]]
    weights: list[float]
    L: float
    L_blocks: list[float]
    x0: torch.Tensor

    @property
    def d(self) -> int:
        return self.X.shape[1]

    @property
    def L_tilde(self) -> float:
        return math.sqrt(sum(v * v for v in self.L_blocks) / self.n)

    def gamma(self, k: int | None = None) -> float:
        return theory_step(self.L, self.L_tilde, self.k if k is None else k, self.d)


def make_problem(name: str, n: int = 20, k: int | None = None, seed: int = 0, data_dir=None,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Problem:
    """The paper's setting for data set ``name`` (its Top-k unless ``k`` is given); ``data``
    = ``(X, y)`` skips loading."""
    X, y = data if data is not None else libsvm.load(name, data_dir)
    N, d = X.shape
    blocks = split(N, n)
    weights = [n * (stop - start) / N for start, stop in blocks]
    gen = torch.Generator().manual_seed(seed)
    return Problem(name=name, X=X, y=y, n=n, k=k or TOP_K.get(name, 1), blocks=blocks, weights=weights,
                   L=smoothness(X), L_blocks=[smoothness(X[a:b], w) for (a, b), w in zip(blocks, weights)],
                   x0=torch.randn(d, generator=gen, dtype=torch.float64))


@dataclass(frozen=True)
class Run:
    """One method at one step multiple, for ``steps`` iterations."""

    algorithm: str  # ef21 | ef | ef21-sgdm | plain | dense
    factor: float
    steps: int
    momentum: float = 1.0  # eta of ef21-sgdm

    @property
    def label(self) -> str:
        eta = f" eta={self.momentum:g}" if self.algorithm == "ef21-sgdm" else ""
        return f"{self.algorithm}{eta} {self.factor:g}x"

    def k(self, problem: Problem) -> int:
        return problem.d if self.algorithm == "dense" else problem.k

    def lr(self, problem: Problem) -> float:
        return self.factor * problem.gamma(self.k(problem))


def default_runs(problem: Problem, steps: int, methods=METHODS, factors=FACTORS, momentum: float = 0.1,
                 reference_factor: float | None = None) -> list[Run]:
    """EF21 and EF at every factor; EF21-SGDM and plain Top-k at ``reference_factor``; dense
    gradient descent (step 1/L) for as many bits as the others send in ``steps`` steps."""
    ref = reference_factor or REFERENCE_FACTOR.get(problem.name, max(factors))
    runs = []
    for algorithm in methods:
        if algorithm in ("ef21", "ef"):
            runs += [Run(algorithm, f, steps) for f in factors]
        elif algorithm in ("ef21-sgdm", "plain"):
            runs.append(Run(algorithm, ref, steps, momentum if algorithm == "ef21-sgdm" else 1.0))
        elif algorithm == "dense":
            runs.append(Run("dense", 1, max(1, math.ceil(steps * problem.k / problem.d))))
        else:
            raise ValueError(f"unknown method {algorithm!r}; allowed: {', '.join(METHODS)}")
    return runs


# -- the workers ------------------------------------------------------------------------------


class Vector(nn.Module):
    """The model: one float64 parameter vector ``x``; ``forward(A) = A @ x`` (the margins)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        return A @ self.x


def train(rank: int, n: int, A: torch.Tensor, b: torch.Tensor, weight: float, x0: torch.Tensor, k: int,
          run: Run, lr: float, iterates: bool = False) -> dict | None:
    """One run on this rank's block through DDP and the ef21 hook; rank 0 returns the record."""
    model = Vector(x0)
    ddp = DistributedDataParallel(model)  # one parameter: one bucket, the compression unit
    state = ef21.register(ddp, ef21.EF21State(algorithm=run.algorithm, k=k, momentum=run.momentum,
                                              init="full", value_dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    T, d = run.steps, x0.numel()
    grads = torch.empty(T + 1, d, dtype=torch.float64)  # this rank's grad F_i(x_t)
    losses = torch.empty(T + 1, dtype=torch.float64)  # F_i(x_t)
    sent = torch.zeros(T + 1, dtype=torch.int64)  # bytes sent by the hook before x_t
    xs = torch.empty(T + 1, d, dtype=torch.float64) if iterates and rank == 0 else None
    now = [0]

    def keep(g: torch.Tensor) -> None:
        # The local gradient, seen before DDP's hook replaces it with the aggregated direction.
        # Returning None matters: a returned tensor would become .grad, and DDP writes into .grad.
        grads[now[0]].copy_(g)

    handle = model.x.register_hook(keep)
    start = time.perf_counter()
    for t in range(T):
        now[0] = t
        if xs is not None:
            xs[t] = model.x.detach()
        opt.zero_grad()
        loss = local_objective(model.x, ddp(A), b, weight)
        losses[t] = loss.detach()
        loss.backward()
        opt.step()
        if rank == 0:
            sent[t + 1] = state.stats()["bytes_sent"]
    seconds = time.perf_counter() - start
    handle.remove()
    loss = local_objective(model.x, model(A), b, weight)  # x_T: outside DDP, no communication
    grads[T] = torch.autograd.grad(loss, model.x)[0]
    losses[T] = loss.detach()
    if xs is not None:
        xs[T] = model.x.detach()
    # One reduction per run instead of one per step: the sum over ranks of grad F_i is n grad f.
    dist.reduce(grads, dst=0)
    dist.reduce(losses, dst=0)
    if rank != 0:
        return None
    return {"grad_norm_sq": (grads / n).pow(2).sum(1), "loss": losses / n, "bytes_sent": sent,
            "seconds": seconds, "stats": state.stats(), "x": model.x.detach().clone(), "iterates": xs}


def _worker(rank: int, n: int, port: int, jobs: list[dict], outdir: str, iterates: bool) -> None:
    # n ranks share the machine's cores; intra-op threads would only contend (OpenMP barriers
    # spin, which on 2 busy cores costs 10-50x on these small matrices).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=timedelta(minutes=10))
    try:
        for j, job in enumerate(jobs):
            start, stop = job["blocks"][rank]
            A, b = job["X"][start:stop], job["y"][start:stop]
            for r, (run, k, lr) in enumerate(job["runs"]):
                record = train(rank, n, A, b, job["weights"][rank], job["x0"], k, run, lr, iterates)
                if rank == 0:
                    torch.save(record, os.path.join(outdir, f"{j}-{r}.pt"))
                    print(f"  {job['name']:10s} {run.label:22s} {run.steps:6d} steps  "
                          f"||grad f||^2 {record['grad_norm_sq'][-1].item():.3e}  "
                          f"{1e3 * record['seconds'] / max(run.steps, 1):6.1f} ms/step", flush=True)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the results are on disk; skip the interpreter's slow teardown of torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    """The record of one run (tensors indexed by the iteration t = 0..steps)."""

    dataset: str
    run: Run
    k: int
    N: int
    d: int
    n: int
    lr: float
    grad_norm_sq: torch.Tensor
    loss: torch.Tensor
    bytes_sent: torch.Tensor
    seconds: float
    stats: dict
    x: torch.Tensor
    iterates: torch.Tensor | None = None

    @property
    def bits(self) -> torch.Tensor:
        """The paper's x-axis: ``32 k t`` bits sent per worker by iteration t."""
        return BITS_PER_VALUE * self.k * torch.arange(self.run.steps + 1, dtype=torch.float64)


def run_experiments(problems: list[Problem], runs: dict[str, list[Run]],
                    iterates: bool = False) -> list[Result]:
    """Runs every ``runs[problem.name]`` in ``problems[0].n`` processes, one gloo rank each."""
    n = problems[0].n
    if any(p.n != n for p in problems):
        raise ValueError("all problems must be split over the same number of workers")
    jobs = [{"name": p.name, "X": p.X, "y": p.y, "blocks": p.blocks, "weights": p.weights, "x0": p.x0,
             "runs": [(r, r.k(p), r.lr(p)) for r in runs[p.name]]} for p in problems]
    # A fork server imports torch once and forks the n ranks from it: spawning them would import
    # torch n times (20 ranks on 2 cores: minutes). torch._dynamo is what DDP's first construction
    # imports (about 900 modules). The children get X through shared memory.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.get_context(method).set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo",
                                                       "ef21.experiments"])
    with tempfile.TemporaryDirectory(prefix="ef21-paper-") as outdir:
        mp.start_processes(_worker, args=(n, _free_port(), jobs, outdir, iterates), nprocs=n, join=True,
                           start_method=method)
        results = []
        for j, (p, job) in enumerate(zip(problems, jobs)):
            for r, (run, k, lr) in enumerate(job["runs"]):
                rec = torch.load(os.path.join(outdir, f"{j}-{r}.pt"), weights_only=False)
                results.append(Result(dataset=p.name, run=run, k=k, N=p.X.shape[0], d=p.d, n=n, lr=lr, **rec))
    return results


# -- reporting --------------------------------------------------------------------------------


def write_csv(result: Result, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.dataset}_{result.run.label.replace(' ', '_').replace('=', '')}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "bits_per_worker", "bytes_sent_rank0", "loss", "grad_norm_sq"])
        for t, (bits, sent, loss, g2) in enumerate(zip(result.bits.tolist(), result.bytes_sent.tolist(),
                                                      result.loss.tolist(), result.grad_norm_sq.tolist())):
            w.writerow([t, int(bits), sent, repr(loss), repr(g2)])
    return path


def best(results: list[Result], dataset: str, algorithm: str) -> Result | None:
    """The run of ``algorithm`` on ``dataset`` with the smallest final ``||grad f||^2``."""
    mine = [r for r in results if r.dataset == dataset and r.run.algorithm == algorithm]
    return min(mine, key=lambda r: r.grad_norm_sq[-1].item()) if mine else None


STYLE = {"ef21": ("tab:blue", "-"), "ef": ("tab:red", "--"), "ef21-sgdm": ("tab:green", "-."),
         "plain": ("tab:gray", ":"), "dense": ("black", ":")}


def _floor(values: torch.Tensor) -> torch.Tensor:
    return values.clamp_min(1e-32)  # exact zeros (never seen so far) would vanish from a log plot


def _top_k(results: list[Result], dataset: str) -> int:
    return next(r.k for r in results if r.dataset == dataset and r.run.algorithm != "dense")


def _row(cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def plot(results: list[Result], folder: Path) -> list[Path]:
    """``<dataset>.png`` (every run) and ``overview.png`` (the best EF21 and EF run per data set,
    as in the paper's figure): ``||grad f(x_t)||^2`` against bits per worker, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    datasets = list(dict.fromkeys(r.dataset for r in results))
    paths = []
    for ds in datasets:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        mine = [r for r in results if r.dataset == ds]
        factors = sorted({r.run.factor for r in mine})
        for r in mine:
            color, ls = STYLE[r.run.algorithm]
            alpha = 0.35 + 0.65 * (factors.index(r.run.factor) + 1) / len(factors)
            ax.plot(r.bits.numpy(), _floor(r.grad_norm_sq).numpy(), color=color, ls=ls, lw=1.2, alpha=alpha,
                    label=r.run.label)
        ax.set_yscale("log")
        ax.set_xlabel("bits per worker (32·k·t)")
        ax.set_ylabel(r"$\|\nabla f(x_t)\|^2$")
        ax.set_title(f"{ds}: n = {mine[0].n}, Top-{_top_k(results, ds)}, d = {mine[0].d}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="lower left")
        fig.tight_layout()
        paths.append(folder / f"{ds}.png")
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(3.2 * len(datasets), 3.0), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for algorithm in ("ef21", "ef", "plain", "dense"):
            r = best(results, ds, algorithm)
            if r is not None:
                color, ls = STYLE[algorithm]
                name = algorithm.upper() if algorithm.startswith("ef") else algorithm
                ax.plot(r.bits.numpy(), _floor(r.grad_norm_sq).numpy(), color=color, ls=ls, lw=1.4,
                        label=f"{name} {r.run.factor:g}x")
        ax.set_yscale("log")
        ax.set_title(f"{ds}, Top-{_top_k(results, ds)}", fontsize=10)
        ax.set_xlabel("bits per worker")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel(r"$\|\nabla f(x_t)\|^2$")
    fig.tight_layout()
    paths.append(folder / "overview.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    return paths


def summary(results: list[Result], total_seconds: float | None = None) -> str:
    """Markdown tables: the final ``||grad f||^2`` per method and data set, then every run."""
    datasets = list(dict.fromkeys(r.dataset for r in results))
    head = ["data set", "N x d", "Top-k", "steps", "bits/worker", "EF21 (best)", "EF (best)", "EF21-SGDM",
            "plain Top-k", "dense GD"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for ds in datasets:
        comp = next(r for r in results if r.dataset == ds and r.run.algorithm != "dense")
        cells = [ds, f"{comp.N} x {comp.d}", comp.k, comp.run.steps, f"{comp.bits[-1].item():.3g}"]
        for algorithm in ("ef21", "ef", "ef21-sgdm", "plain", "dense"):
            r = best(results, ds, algorithm)
            cells.append("—" if r is None else f"{r.grad_norm_sq[-1].item():.2e} ({r.run.factor:g}x)")
        lines.append(_row(cells))
    lines += ["", ("Every run (final and smallest ‖∇f‖² over the run; bytes the hook sent from rank 0, "
                   "float64 values and int32 indices, the initial dense step included):"), ""]
    head = ["data set", "method", "step", "steps", "final ‖∇f‖²", "min ‖∇f‖²", "f(x_T)", "bytes sent",
            "ms/step"]
    lines += [_row(head), "|" + "---|" * len(head)]
    for r in results:
        g2 = r.grad_norm_sq
        lines.append(_row([r.dataset, r.run.label.rsplit(" ", 1)[0], f"{r.run.factor:g}x γ = {r.lr:.3g}",
                           r.run.steps, f"{g2[-1].item():.2e}", f"{g2.min().item():.2e}", f"{r.loss[-1].item():.6f}",
                           int(r.bytes_sent[-1]), f"{1e3 * r.seconds / max(r.run.steps, 1):.1f}"]))
    if total_seconds is not None:
        steps = sum(r.run.steps for r in results)
        lines += ["", (f"Wall time of the whole command: {total_seconds / 60:.1f} min ({steps} DDP steps "
                       f"in all, n = {results[0].n} ranks).")]
    return "\n".join(lines) + "\n"


def update_page(page: Path, text: str, section: str = "results") -> None:
    """Replaces the part of ``page`` between ``<!-- section:begin -->`` and ``<!-- section:end -->``
    with ``text``."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    old = page.read_text() if page.exists() else f"{begin}\n{end}\n"
    if begin not in old or end not in old:
        raise ValueError(f"{page} has no {begin} ... {end} section to fill")
    before, rest = old.split(begin, 1)
    after = rest.split(end, 1)[1]
    page.write_text(f"{before}{begin}\n{text}{end}{after}")


def _number(cast, low: float = 0, high: float | None = None):
    """An argparse type: ``cast(text)`` with ``low < value`` (and ``value <= high``), else a one-line
    error that names the value and what is allowed."""
    kind = "an integer" if cast is int else "a number"
    allowed = f"{kind} > {low:g}" if high is None else f"{kind} with {low:g} < value <= {high:g}"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        # math.isfinite also refuses nan, which every comparison lets through
        if value is None or not math.isfinite(value) or value <= low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {allowed}")
        return value

    return parse


def _per_dataset(cast):
    """An argparse type: ``"600"`` (one value for every data set) or ``"a9a=600,w8a=900"`` (a dict),
    each value read by ``cast``."""

    def parse(text: str):
        if "=" not in text:
            return cast(text)
        out = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not NAME=VALUE; allowed: one "
                                                 "value, or NAME=VALUE,... per data set")
            out[key.strip()] = cast(value)
        return out

    return parse


def _list_of(cast):
    """An argparse type: comma-separated values, each read by ``cast``; at least one."""

    def parse(text: str) -> list:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: one value or more, "
                                             "comma-separated")
        return values

    return parse


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a method; allowed: {', '.join(METHODS)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ef21.experiments",
        description="The EF21 paper's logistic regression (nonconvex regulariser, lambda = 0.1) on LibSVM "
                    "data, n ranks on gloo, through the ef21 DDP hook: EF21 vs EF (and EF21-SGDM, plain "
                    "Top-k, dense) at equal bits.")
    parser.add_argument("--datasets", type=_list_of(str), default=",".join(TOP_K),
                        help="comma-separated: the paper's, or <name>.txt files in the data folder "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=_number(int), default=20,
                        help="ranks = processes (default: %(default)s)")
    parser.add_argument("--steps", type=_per_dataset(_number(int)), default=None,
                        help="iterations: one number, or per data set as a9a=600,w8a=900 "
                             f"(default: {','.join(f'{k}={v}' for k, v in STEPS.items())})")
    parser.add_argument("--k", type=_per_dataset(_number(int)), default=None,
                        help="Top-k: one number or per data set (default: the paper's, "
                             f"{','.join(f'{k}={v}' for k, v in TOP_K.items())})")
    parser.add_argument("--factors", type=_list_of(_number(float)), default=",".join(map(str, FACTORS)),
                        help="multiples of the theory step for EF21 and EF (default: %(default)s)")
    parser.add_argument("--reference-factor", type=_per_dataset(_number(float)), default=None,
                        help="multiple for EF21-SGDM and plain Top-k: one number or per data set (default: "
                             f"{','.join(f'{k}={v:g}' for k, v in REFERENCE_FACTOR.items())})")
    parser.add_argument("--methods", type=_list_of(_method), default=",".join(METHODS),
                        help="subset of %(default)s")
    parser.add_argument("--momentum", type=_number(float, 0, 1), default=0.1,
                        help="eta of EF21-SGDM (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of x^0 (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="folder with <name>.txt (default: $EF21_DATA_DIR, "
                        "else ../shared/data, else ~/.cache/ef21, else download)")
    parser.add_argument("--out", default="runs/paper_reproduction",
                        help="plots, summary.md and summary.json (default: %(default)s)")
    parser.add_argument("--csv-dir", default=None, help="one CSV per run (default: <out>/csv)")
    parser.add_argument("--page", default=None,
                        help="a markdown page whose <!-- SECTION:begin --> ... <!-- SECTION:end --> part "
                             "receives the summary")
    parser.add_argument("--section", default="results", help="SECTION of --page (default: %(default)s)")
    args = parser.parse_args(argv)

    datasets, factors, methods = args.datasets, args.factors, args.methods
    for ds in datasets:
        if ds not in libsvm.DATASETS:  # the paper's are downloaded when missing; any other must be here
            try:
                libsvm.find(ds, args.data_dir, download=False)
            except FileNotFoundError as err:
                parser.error(f"--datasets {ds!r}: {err}")

    def per_dataset(flag: str, value) -> dict:
        if not isinstance(value, dict):
            return {} if value is None else dict.fromkeys(datasets, value)
        for name in value:  # a misspelt name would silently leave the default in place
            if name not in datasets:
                parser.error(f"{flag}: {name!r} is not a data set of this run; allowed: "
                             f"{', '.join(datasets)}")
        return value

    steps = {**STEPS, **per_dataset("--steps", args.steps)}
    ks = {**TOP_K, **per_dataset("--k", args.k)}
    refs = {**REFERENCE_FACTOR, **per_dataset("--reference-factor", args.reference_factor)}
    out = Path(args.out)
    csv_dir = Path(args.csv_dir) if args.csv_dir else out / "csv"

    t0 = time.perf_counter()
    problems, runs = [], {}
    for ds in datasets:
        try:
            data = libsvm.load(ds, args.data_dir)
        except (OSError, ValueError) as err:  # not found and not downloadable, or not LibSVM
            parser.error(f"--datasets {ds!r}: {err}")
        if len(data[0]) < args.workers:  # every rank needs a row
            parser.error(f"--workers: {args.workers} is too many for {ds}; allowed: at most its "
                         f"{len(data[0])} rows")
        p = make_problem(ds, n=args.workers, k=ks.get(ds), seed=args.seed, data_dir=args.data_dir, data=data)
        problems.append(p)
        runs[ds] = default_runs(p, steps.get(ds, 500), methods, factors, args.momentum, refs.get(ds))
        print(f"{ds}: N={p.X.shape[0]} d={p.d} n={p.n} Top-{p.k}  L={p.L:.4g}  L~={p.L_tilde:.4g}  "
              f"gamma={p.gamma():.4g}  {len(runs[ds])} runs", flush=True)
    results = run_experiments(problems, runs)
    total = time.perf_counter() - t0

    for r in results:
        write_csv(r, csv_dir)
    paths = plot(results, out)
    text = summary(results, total)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        [{"dataset": r.dataset, **asdict(r.run), "k": r.k, "lr": r.lr,
          "final_grad_norm_sq": r.grad_norm_sq[-1].item(), "min_grad_norm_sq": r.grad_norm_sq.min().item(),
          "final_loss": r.loss[-1].item(), "bits_per_worker": r.bits[-1].item(),
          "bytes_sent": int(r.bytes_sent[-1]), "seconds": r.seconds} for r in results], indent=1))
    if args.page:
        update_page(Path(args.page), text, args.section)
    print(text)
    print(f"wrote {len(results)} CSVs to {csv_dir}, plots {', '.join(str(p) for p in paths)}; "
          f"total {total / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
