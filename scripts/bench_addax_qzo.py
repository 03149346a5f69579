"""Benchmark Addax and QZO against full-weight MeZO on the quickstart model and data (SmolLM2-135M,
Rotten Tomatoes sentiment by prompt + verbalizers), on the machine it runs on.

Part 1 (all 134.5M weights, configs/quickstart.yaml): MeZO (the quickstart's lr 5e-5) vs in-place SGD
(IP-SGD: Addax with alpha 0 on every sequence) vs Addax (ZO on sequences longer than L_T, IP-SGD on the
others). Held-out accuracy and loss every --eval-every steps; steps and training seconds until each
method first reaches MeZO's final accuracy; peak memory.
Part 2 (configs/qzo_nf4.yaml): QZO on the NF4 scales vs MeZO on all weights in fp32 and bf16: weight
memory, peak memory, held-out accuracy/loss before and after the same number of steps.

Each configuration runs in a fresh subprocess; peak memory is the process's VmHWM after loading and data
preparation were done and the high-water mark was reset (so it counts training and evaluation only).
Learning rates come from the sweep recorded in the README; ``--lr NAME=VALUE`` overrides one.

    PYTHONPATH=. python scripts/bench_addax_qzo.py                      # everything, ~1 h on 2 CPU cores
    PYTHONPATH=. python scripts/bench_addax_qzo.py --only ipsgd --steps 20 --lr ipsgd=1e-3   # a sweep point
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART1 = ("mezo", "ipsgd", "addax")
PART2 = ("mezo_fp32", "mezo_bf16", "qzo_nf4")
# Learning rates: MeZO's from the quickstart sweep; the others from this script's --steps 20 sweeps (README).
LR = {
    "mezo": 5e-5,
    "ipsgd": 3e-4,
    "addax": 3e-4,
    "mezo_fp32": 5e-5,
    "mezo_bf16": 5e-5,
    "qzo_nf4": 1e-3,
}


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024**2  # kB -> GB
    return float("nan")


def _recipe_and_overrides(name: str, a, lr: float) -> tuple[Path, list[str]]:
    common = [
        f"train.max_steps={a.steps}",
        "train.per_device_train_batch_size=16",
        "train.save_strategy='no'",
        "train.logging_steps=10",
        "train.disable_tqdm=true",
        f"train.learning_rate={lr}",
        f"data.max_eval_samples={a.eval_samples}",
        "output.save_model=false",
        "output.save_trajectory=false",
    ]
    table = {
        "mezo": ["method.name=mezo"],
        # alpha 0 and a threshold above max_length: every sequence goes to the in-place first-order part.
        "ipsgd": ["method.name=addax", "method.alpha=0.0", "method.length_threshold=1000", "method.fo_batch_size=16"],
        "addax": ["method.name=addax", f"method.alpha={a.alpha}", f"method.length_threshold={a.threshold}",
                  "method.zo_batch_size=16", "method.fo_batch_size=16"],
        "mezo_fp32": ["method.name=mezo", "model.dtype=float32"],
        "mezo_bf16": ["method.name=mezo", "model.dtype=bfloat16"],
        "qzo_nf4": [],
    }
    recipe = "qzo_nf4.yaml" if name == "qzo_nf4" else "quickstart.yaml"
    return ROOT / "configs" / recipe, common + table[name]


def worker(name: str, a, out_dir: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from zoft import run
    from zoft.config import load_recipe
    from zoft.zo import quant4bit as q4

    torch.set_num_threads(a.threads)
    lr = a.lr_table[name]
    path, overrides = _recipe_and_overrides(name, a, lr)
    recipe = load_recipe(path, overrides + [f"output.dir={out_dir}", "output.overwrite=true"])
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    model = trainer.model
    weights = q4.quantized_weight_bytes(model)["total"] / 1e9
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    curve_evals = name in PART1 and a.eval_every > 0

    class Clock(TrainerCallback):
        """Training seconds (evaluations excluded) and the eval curve."""

        def __init__(self):
            self.train_s, self.t0, self.curve = 0.0, None, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.train_s += time.perf_counter() - self.t0
            if curve_evals and state.global_step % a.eval_every == 0 and state.global_step < a.steps:
                control.should_evaluate = True

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.curve.append((state.global_step, self.train_s, metrics.get("eval_accuracy"), metrics.get("eval_loss")))
            print(f"[{name}] step {state.global_step}: acc {metrics.get('eval_accuracy'):.4f} "
                  f"loss {metrics.get('eval_loss'):.4f} ({self.train_s:.0f} s training)", file=sys.stderr, flush=True)

    clock = Clock()
    trainer.add_callback(clock)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: count training + evaluation only
    base_rss = _vm("VmRSS")
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    return {
        "name": name,
        "lr": lr,
        "weights_gb": weights,
        "trainable": trainable,
        "rss_after_load_gb": base_rss,
        "peak_gb": _vm("VmHWM"),
        "train_s": clock.train_s,
        "steps": trainer.state.global_step,
        "before": before["eval_accuracy"],
        "after": after["eval_accuracy"],
        "loss_before": before["eval_loss"],
        "loss_after": after["eval_loss"],
        "curve": clock.curve[1:],  # the first evaluation is "before" (step 0)
    }


def _reach(curve, target):
    """(step, training seconds) of the first evaluation at or above ``target``; (None, None) if none."""
    for step, secs, acc, _ in curve:
        if step > 0 and acc is not None and acc >= target - 1e-9:
            return step, secs
    return None, None


def _lr_table(pairs: list[str]) -> dict[str, float]:
    table = dict(LR)
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in table or not value:
            raise SystemExit(f"--lr {pair!r}: expected NAME=VALUE with NAME in {', '.join(table)}")
        table[key] = float(value)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps of every configuration")
    p.add_argument("--eval-every", type=int, default=10, help="part 1: evaluate every N steps (0: before/after only)")
    p.add_argument("--eval-samples", type=int, default=300, help="held-out examples (the quickstart's 300)")
    p.add_argument("--threshold", type=int, default=34, help="Addax L_T in tokens (about the median length)")
    p.add_argument("--alpha", type=float, default=0.05, help="Addax's weight of the ZO estimate")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE", help="override a learning rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(PART1 + PART2[1:]),
                   help="configurations to run; mezo_fp32 is part 1's mezo run unless listed explicitly")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/zoft_bench_addax_qzo")
    p.add_argument("--json", help="also write all results to this file")
    a = p.parse_args()
    a.lr_table = _lr_table(a.lr)
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a, f"{a.out}/{a.worker}")), flush=True)
        return

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{a.threads} threads), load average at start {os.getloadavg()[0]:.1f}")
    results = {}
    for name in a.only.split(","):
        t = time.perf_counter()
        argv = [sys.executable, __file__, "--worker", name] + sys.argv[1:]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed (exit {proc.returncode}); see its stderr above")
            continue
        results[name] = json.loads(line[7:])
        print(f"  {name} done in {time.perf_counter() - t:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    if "mezo" in results and "mezo_fp32" not in results:
        results["mezo_fp32"] = results["mezo"]  # the same run: quickstart recipe, fp32, all weights
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))

    trio = [n for n in PART1 if n in results]
    if trio:
        target = results["mezo"]["after"] if "mezo" in results else None
        t_txt = f"{target:.3f}" if target is not None else "n/a (mezo not run)"
        print(f"\n### MeZO vs IP-SGD vs Addax (all weights; {a.steps} steps, batch 16, L_T {a.threshold}, "
              f"alpha {a.alpha}; {a.eval_samples} held-out); target = MeZO's final accuracy {t_txt}\n")
        print("| method | lr | acc before | acc after | loss before | loss after | steps to target | "
              "train s to target | s/step | peak GB | peak / MeZO |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n in trio:
            r = results[n]
            step, secs = _reach(r["curve"], target) if target is not None else (None, None)
            ratio = r["peak_gb"] / results["mezo"]["peak_gb"] if "mezo" in results else float("nan")
            print(f"| {n} | {r['lr']:g} | {r['before']:.3f} | {r['after']:.3f} | {r['loss_before']:.3f} | "
                  f"{r['loss_after']:.3f} | {step if step is not None else 'not reached'} | "
                  f"{'-' if secs is None else f'{secs:.0f}'} | {r['train_s'] / r['steps']:.2f} | "
                  f"{r['peak_gb']:.2f} | {ratio:.2f} |")
        print()
        for n in trio:
            print(f"{n} curve (step, train s, acc, loss): "
                  + ", ".join(f"({s}, {t:.0f}, {acc:.3f}, {loss:.3f})" for s, t, acc, loss in results[n]["curve"]))
    quad = [n for n in PART2 if n in results]
    if quad:
        print(f"\n### QZO (NF4 scales) vs MeZO on all weights ({a.steps} steps, batch 16, {a.eval_samples} held-out)\n")
        print("| method | lr | trained values | weight GB | weights / fp32 | peak GB | peak / fp32 | acc before | "
              "acc after | loss before | loss after | s/step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        ref = results.get("mezo_fp32")
        for n in quad:
            r = results[n]
            wr = r["weights_gb"] / ref["weights_gb"] if ref else float("nan")
            pr = r["peak_gb"] / ref["peak_gb"] if ref else float("nan")
            print(f"| {n} | {r['lr']:g} | {r['trainable']:,} | {r['weights_gb']:.3f} | {wr:.2f} | {r['peak_gb']:.2f} | "
                  f"{pr:.2f} | {r['before']:.3f} | {r['after']:.3f} | {r['loss_before']:.3f} | {r['loss_after']:.3f} | "
                  f"{r['train_s'] / max(r['steps'], 1):.2f} |")


if __name__ == "__main__":
    main()
