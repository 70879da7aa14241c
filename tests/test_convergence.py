"""EF21 converges linearly where plain Top-k stalls: heterogeneous least squares under PL.

Each of 4 ranks holds its own A_i (100 x 20) and b_i with a different optimum;
f(x) = mean_i ||A_i x - b_i||^2 / (2 m), a Linear(20, 1, bias=False) model in float64 (state is
float64 for float64 buckets), full local gradients, plain SGD. Top-2 of 20 per step (ratio 0.1),
step size 4x the EF21 theory step gamma = 1/(L + L~ sqrt(beta/theta)) (multiples of it as in the
paper's experiments). EF21 reaches ||grad f||^2 < 1e-10 in 300 steps; plain Top-k stalls at the
point where the mean of the compressed local gradients vanishes, far from the optimum.
"""

import functools
import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import ef21
from common import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD, D, M = 4, 20, 100
RATIO = 0.1
STEPS = 300


@functools.cache
def problem(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    a = torch.randn(M, D, generator=gen, dtype=torch.float64) * (1 + 0.3 * rank)
    x_star = 3 * torch.randn(D, generator=gen, dtype=torch.float64)  # each rank its own optimum
    b = a @ x_star + 0.1 * torch.randn(M, generator=gen, dtype=torch.float64)
    return a, b


def theory_step(k: int) -> float:
    """EF21's step for Top-k: 1 / (L + L~ sqrt(beta / theta)), alpha = k / d."""
    hessians = [a.T @ a / M for a, _ in map(problem, range(WORLD))]
    big_l = torch.linalg.eigvalsh(sum(hessians) / WORLD)[-1].item()
    l_tilde = math.sqrt(sum(torch.linalg.eigvalsh(h)[-1].item() ** 2 for h in hessians) / WORLD)
    alpha = k / D
    theta = 1 - math.sqrt(1 - alpha)
    beta = (1 - alpha) / theta
    return 1 / (big_l + l_tilde * math.sqrt(beta / theta))


def grad_norm_sq(x: torch.Tensor) -> float:
    g = sum(a.T @ (a @ x - b) / M for a, b in map(problem, range(WORLD))) / WORLD
    return float(g.pow(2).sum())


def least_squares(rank: int, world_size: int, algorithms: list[str], lr: float) -> dict:
    return {algorithm: _least_squares(rank, algorithm, lr) for algorithm in algorithms}


def _least_squares(rank: int, algorithm: str, lr: float) -> list[torch.Tensor]:
    a, b = problem(rank)
    net = torch.nn.Linear(D, 1, bias=False).to(torch.float64)
    torch.nn.init.zeros_(net.weight)
    ddp = DistributedDataParallel(net)
    ef21.register(ddp, ef21.EF21State(algorithm=algorithm, compressor="topk", ratio=RATIO))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    xs = []
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (ddp(a).squeeze(1) - b).pow(2).mean()).backward()  # full local gradient
        opt.step()
        xs.append(net.weight.detach().reshape(-1).clone())
    return xs


@pytest.fixture(scope="module")
def histories():
    lr = 4 * theory_step(math.ceil(RATIO * D))
    runs = run_distributed(least_squares, WORLD, ["ef21", "plain"], lr)[0]
    return {algorithm: [grad_norm_sq(x) for x in xs] for algorithm, xs in runs.items()}


def test_ef21_converges_linearly(histories):
    h = histories["ef21"]
    assert h[-1] < 1e-10, h[-1]
    # Linear rate: every 100 steps cut ||grad f||^2 by orders of magnitude, not a sublinear crawl.
    assert h[199] < 1e-3 * h[99] and h[299] < 1e-3 * h[199], (h[99], h[199], h[299])


def test_plain_topk_stalls(histories):
    h = histories["plain"]
    assert min(h[100:]) > 1.0, min(h[100:])
