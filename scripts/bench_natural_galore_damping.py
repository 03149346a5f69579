"""Natural GaLore's damping on a drifting toy problem: the paper's absolute lambda vs zoft's relative one.

    PYTHONPATH=$PWD python scripts/bench_natural_galore_damping.py       # a few seconds

Projected gradients ``g_t = c * (drift + noise_t)`` in d = 64 dimensions: a fixed drift direction (the part
every gradient shares) plus fresh Gaussian noise, sized so that the drift holds about half of a raw
gradient's squared norm. The empirical Fisher of the window (the last s = 20 gradients) sees the drift in
every column, so preconditioning by it shrinks the drift relative to the noise; how much depends on the
damping. Each row runs zoft's own natural-gradient step (``NaturalGaLore._natural_gradient``) for 200
steps and reports the drift's share of the preconditioned gradient, ``(g~ . d)^2 / |g~|^2`` with d the unit
drift direction, averaged over the steps after the window has filled. The gradient scale c is swept: the
relative damping (lambda = damping x the window's mean |g|^2) gives the same share at every scale, the
absolute one (the paper's lambda = 1e-3) whitens harder the larger the gradients are against sqrt(lambda).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch

S, STEPS = 20, 200
D = 64  # set by --dim


def shares(scale: float, mode: str | None, damping: float | None, seed: int = 0) -> float:
    """Mean drift share of the natural gradient (mode None: the raw gradient)."""
    from zoft.optim.natural_galore import NaturalGaLore

    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(D, generator=g, dtype=torch.float64)
    drift = drift / drift.norm() * (1.17 * D) ** 0.5  # |drift|^2 = 1.17 d: about half of E|g|^2 = 2.17 d
    unit = drift / drift.norm()
    state: dict = {}
    group = {"history": S, "damping": damping, "damping_mode": mode}
    out = []
    for t in range(STEPS):
        grad = scale * (drift + torch.randn(D, generator=g, dtype=torch.float64))
        step = grad if mode is None else NaturalGaLore._natural_gradient(state, grad.float(), group).double()
        if t >= S:
            out.append(float((step @ unit) ** 2 / (step @ step)))
    return statistics.mean(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="*", default=[1e-3, 1e-2, 0.1, 1.0, 10.0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--dim", type=int, default=64, help="d, the projected gradient's size (r x n)")
    args = parser.parse_args()
    global D
    D = args.dim
    rows = [
        ("raw gradient (no Fisher)", None, None),
        ("absolute, lambda 1e-3 (the paper's; zoft's default)", "absolute", 1e-3),
        ("relative, damping 1.0 (zoft's former default)", "relative", 1.0),
        ("relative, damping 0.1", "relative", 0.1),
        ("relative, damping 0.01", "relative", 0.01),
    ]
    print(f"# d {D}, window s {S}, {STEPS} steps, mean over seeds {args.seeds}; torch {torch.__version__}, "
          f"{platform.machine()}")
    print("# drift's share of the preconditioned gradient, (g~ . d)^2 / |g~|^2; columns: gradient scale c "
          "(per-coordinate gradient size)")
    print("| step | " + " | ".join(f"c = {c:g}" for c in args.scales) + " |")
    print("|---|" + "---:|" * len(args.scales))
    for label, mode, damping in rows:
        vals = [statistics.mean(shares(c, mode, damping, seed) for seed in args.seeds) for c in args.scales]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
