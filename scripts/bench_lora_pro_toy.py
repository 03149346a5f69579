"""LoRA-Pro on a toy low-rank regression: plain LoRA vs the paper's algorithm vs the removed "efficient" mode.

    PYTHONPATH=$PWD python scripts/bench_lora_pro_toy.py            # 3 seeds x 500 steps, a few seconds
    python scripts/bench_lora_pro_toy.py --seeds 0 1 2 3 4 --steps 1000 --lr 1e-3

One 32 x 32 linear layer, a peft LoRA adapter (r 4, alpha 8, peft's init: B = 0) on it, and a regression
target ``W* = W0 + D`` whose change D has rank 8 (so rank 4 cannot fit it exactly). Loss: mean over 256
fixed inputs of ``|W x - W* x|^2``. Rows, all with the same lr, betas (0.9, 0.999), eps 1e-8, no weight decay:

- ``lora``: AdamW on A and B (what ``peft.optimizer: default`` gives);
- ``lora_pro``: zoft's LoRA-Pro (``create_lora_pro_optimizer``, the paper's Algorithm 1, the default);
- ``efficient (removed)``: zoft's former default, AdamW on LoRA-Pro's corrected A/B gradients
  (:func:`zoft.lora.pro.lora_pro_gradients` then ``torch.optim.AdamW``), rebuilt here to show why it went;
- ``full FT``: Adam on W itself (rank unconstrained), for scale;
- ``rank-r optimum``: the lowest loss any ``W0 + s B A`` reaches (truncated SVD in the inputs' metric).

It also prints, for the efficient mode, the size of the corrected A-gradient at the first step where it is
non-zero (step 2: B = 0 at step 1 makes it 0) against LoRA's raw one: the outlier that Adam's second moment
keeps for thousands of steps.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch

M = N = 32
RANK_TARGET = 8


def problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(M, N, generator=g) / N**0.5
    change = (torch.randn(M, RANK_TARGET, generator=g) @ torch.randn(RANK_TARGET, N, generator=g)) / N**0.5
    x = torch.randn(256, N, generator=g)
    return w0, x, x @ (w0 + change).T


def rank_r_optimum(seed: int, r: int) -> float:
    """min over rank-r C of mean |(W0 + C) x - y|^2 = |(D - C) S^1/2|_F^2, S = X^T X / n: truncated SVD."""
    w0, x, y = problem(seed)
    change = torch.linalg.lstsq(x, y - x @ w0.T).solution.T.double()  # D, exactly (y is noise-free)
    evals, evecs = torch.linalg.eigh((x.T @ x / x.shape[0]).double())
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    singular = torch.linalg.svdvals(change @ root)
    return float((singular[r:] ** 2).sum())


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).sum(-1).mean()


def lora_model(w0, seed: int, r: int):
    from peft import LoraConfig, get_peft_model

    layer = torch.nn.Linear(N, M, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w0)
    torch.manual_seed(seed)  # peft's A init
    return get_peft_model(torch.nn.Sequential(layer), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))


def run(method: str, seed: int, steps: int, lr: float, r: int, marks: list[int]):
    """Training loss at each step in ``marks``, and (efficient only) (|corrected gA|, |raw gA|) at step 2."""
    from zoft.lora.pro import create_lora_pro_optimizer, find_lora_pairs, lora_pro_gradients

    w0, x, y = problem(seed)
    if method == "full FT":
        model = torch.nn.Sequential(torch.nn.Linear(N, M, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(w0)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        model = lora_model(w0, seed, r)
        params = [p for p in model.parameters() if p.requires_grad]
        if method == "lora_pro":
            optimizer = create_lora_pro_optimizer(model, lr=lr)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pairs = find_lora_pairs(model) if method == "efficient (removed)" else []
    ratio, at = None, {}
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        for p in pairs:  # the former efficient mode: corrected gradients, then AdamW
            raw = p.A.grad.norm().item()
            new_a, new_b = lora_pro_gradients(p.A, p.B, p.A.grad, p.B.grad, p.scaling)
            if step == 2:
                ratio = (new_a.norm().item(), raw)
            p.A.grad.copy_(new_a)
            p.B.grad.copy_(new_b)
        optimizer.step()
        if step in marks:
            with torch.no_grad():
                at[step] = loss_of(model, x, y).item()
    return at, ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    marks = sorted({args.steps // 5, args.steps // 2, args.steps})
    methods = ["lora", "lora_pro", "efficient (removed)", "full FT"]
    optimum = {seed: rank_r_optimum(seed, args.rank) for seed in args.seeds}
    print(f"# 32x32 regression, target change of rank {RANK_TARGET}, LoRA r {args.rank}, lr {args.lr:g}, "
          f"{args.steps} steps, seeds {args.seeds}; torch {torch.__version__}, {platform.machine()}, 1 thread")
    print(f"# rank-{args.rank} optimum (lowest loss of any W0 + s B A) per seed: "
          + ", ".join(f"{optimum[s]:.3f}" for s in args.seeds))
    print(f"# loss minus the rank-{args.rank} optimum (full FT: minus 0, it can reach 0); final loss per seed last")
    print("| method | " + " | ".join(f"excess @{m} (mean)" for m in marks) + " | final loss per seed |")
    print("|---|" + "---:|" * len(marks) + "---|")
    ratios = []
    for method in methods:
        rows = []
        for seed in args.seeds:
            at, ratio = run(method, seed, args.steps, args.lr, args.rank, marks)
            rows.append(at)
            if ratio is not None:
                ratios.append(ratio)
        base = {s: 0.0 if method == "full FT" else optimum[s] for s in args.seeds}
        excess = [statistics.mean(at[m] - base[s] for at, s in zip(rows, args.seeds)) for m in marks]
        finals = " / ".join(f"{at[args.steps]:.2f}" for at in rows)
        print(f"| {method} | " + " | ".join(f"{e:.3f}" for e in excess) + f" | {finals} |", flush=True)
    if ratios:
        corrected, raw = ratios[0]
        print(f"# efficient (removed), seed {args.seeds[0]}, step 2: |corrected gA| {corrected:.3g} vs LoRA's "
              f"|gA| {raw:.3g} ({corrected / raw:.3g}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
