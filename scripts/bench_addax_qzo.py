"""Benchmark Addax and QZO on the quickstart model and data (SmolLM2-135M, Rotten Tomatoes), CPU.

Part 1 (LoRA, as configs/mezo_lora.yaml): MeZO vs in-place SGD (Addax with alpha=0) vs Addax: eval
accuracy at fixed steps, steps and training time to reach MeZO's final accuracy, peak memory.
Part 2 (full model, no adapters): QZO on NF4 vs MeZO in fp32 and bf16: weight memory, peak memory, eval
accuracy before/after.

Each configuration runs in a fresh subprocess; peak memory is the process's VmHWM after loading and data
preparation were done and the high-water mark was reset (so it counts training and evaluation only).

    PYTHONPATH=. python scripts/bench_addax_qzo.py [--steps 20 --eval-every 10 --eval-samples 100]
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


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024**2  # kB -> GB
    return float("nan")


def _overrides(name: str, a) -> list[str]:
    common = [
        f"train.max_steps={a.steps}",
        "train.per_device_train_batch_size=16",
        "train.save_strategy='no'",
        "train.logging_steps=5",
        "train.disable_tqdm=true",
        f"data.max_train_samples={a.train_samples}",
        f"data.max_eval_samples={a.eval_samples}",
        "output.save_model=false",
        "output.save_trajectory=false",
    ]
    lora = ["method.eps=1e-3"]
    full = ["peft=null", "train.learning_rate=1e-6", f"train.max_steps={a.qzo_steps}"]
    table = {
        "mezo": lora + ["method.name=mezo", "train.learning_rate=1e-3"],
        "ipsgd": lora + ["method.name=addax", "method.alpha=0.0", "method.length_threshold=1000",
                         "method.fo_batch_size=16", "train.learning_rate=1e-2"],
        "addax": lora + ["method.name=addax", "method.alpha=0.05", f"method.length_threshold={a.threshold}",
                         "method.zo_batch_size=16", "method.fo_batch_size=16", "train.learning_rate=1e-2"],
        "mezo_fp32": full + ["method.name=mezo", "model.dtype=float32"],
        "mezo_bf16": full + ["method.name=mezo", "model.dtype=bfloat16"],
        "qzo_nf4": full + ["method.name=qzo", "model.quantization=nf4", "train.learning_rate=1e-5"],
    }
    return common + table[name]


def worker(name: str, a, out_dir: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from zoft import run
    from zoft.config import load_recipe
    from zoft.zo import quant4bit as q4

    torch.set_num_threads(a.threads)
    recipe = load_recipe(ROOT / "configs" / "mezo_lora.yaml", _overrides(name, a) + [f"output.dir={out_dir}",
                                                                                       "output.overwrite=true"])
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    model = trainer.model
    weights = q4.quantized_weight_bytes(model)["total"] / 1e9
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Clock(TrainerCallback):
        def __init__(self):
            self.train_s, self.t0, self.curve = 0.0, None, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.train_s += time.perf_counter() - self.t0
            if a.eval_every and state.global_step % a.eval_every == 0 and state.global_step < a.steps:
                control.should_evaluate = name in ("mezo", "ipsgd", "addax")

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.curve.append((state.global_step, self.train_s, metrics.get("eval_accuracy")))

    clock = Clock()
    trainer.add_callback(clock)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: count training + evaluation only
    base_rss = _vm("VmRSS")
    before = trainer.evaluate()["eval_accuracy"]
    clock.curve.clear()
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    return {
        "name": name,
        "weights_gb": weights,
        "trainable": trainable,
        "rss_after_load_gb": base_rss,
        "peak_gb": _vm("VmHWM"),
        "train_s": clock.train_s,
        "steps": trainer.state.global_step,
        "before": before,
        "after": after,
        "curve": clock.curve + [(trainer.state.global_step, clock.train_s, after)],
    }


def _reach(curve, target):
    for step, secs, acc in curve:
        if acc is not None and acc >= target - 1e-9:
            return step, secs
    return None, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="steps of MeZO / IP-SGD / Addax")
    p.add_argument("--qzo-steps", type=int, default=10, help="steps of QZO and full-model MeZO")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--threshold", type=int, default=34, help="Addax L_T (the median length of the data)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="mezo,ipsgd,addax,mezo_fp32,mezo_bf16,qzo_nf4")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/zoft_bench_addax_qzo")
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a, f"{a.out}/{a.worker}")), flush=True)
        return

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{a.threads} threads), load average {os.getloadavg()[0]:.1f}")
    results = {}
    for name in a.only.split(","):
        t = time.perf_counter()
        argv = [sys.executable, __file__, "--worker", name] + sys.argv[1:]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[7:])
        print(f"  {name} done in {time.perf_counter() - t:.0f} s", flush=True)

    trio = [n for n in ("mezo", "ipsgd", "addax") if n in results]
    if trio:
        target = results["mezo"]["after"] if "mezo" in results else None
        print(f"\n### MeZO vs IP-SGD vs Addax (LoRA r=8 q,v; {a.steps} steps, batch 16, eval on "
              f"{a.eval_samples}); target = MeZO's final accuracy {target}\n")
        print("| method | acc before | acc after | steps to target | train s to target | train s total | "
              "s/step | peak GB | peak / MeZO |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in trio:
            r = results[n]
            step, secs = _reach(r["curve"], target) if target is not None else (None, None)
            ratio = r["peak_gb"] / results["mezo"]["peak_gb"] if "mezo" in results else float("nan")
            print(f"| {n} | {r['before']:.3f} | {r['after']:.3f} | {step if step is not None else 'not reached'} | "
                  f"{'-' if secs is None else f'{secs:.0f}'} | {r['train_s']:.0f} | {r['train_s'] / r['steps']:.2f} | "
                  f"{r['peak_gb']:.2f} | {ratio:.2f} |")
        for n in trio:
            print(f"{n} curve (step, train s, acc): "
                  + ", ".join(f"({s}, {t:.0f}, {acc:.3f})" for s, t, acc in results[n]["curve"]))
    quad = [n for n in ("mezo_fp32", "mezo_bf16", "qzo_nf4") if n in results]
    if quad:
        print(f"\n### QZO (NF4 scales) vs MeZO full model ({a.qzo_steps} steps, batch 16, eval on "
              f"{a.eval_samples})\n")
        print("| method | trained values | weight GB | weights / fp32 | peak GB | peak / fp32 | acc before | "
              "acc after | s/step |")
        print("|---|---|---|---|---|---|---|---|---|")
        ref = results.get("mezo_fp32")
        for n in quad:
            r = results[n]
            wr = r["weights_gb"] / ref["weights_gb"] if ref else float("nan")
            pr = r["peak_gb"] / ref["peak_gb"] if ref else float("nan")
            print(f"| {n} | {r['trainable']:,} | {r['weights_gb']:.3f} | {wr:.2f} | {r['peak_gb']:.2f} | {pr:.2f} | "
                  f"{r['before']:.3f} | {r['after']:.3f} | {r['train_s'] / max(r['steps'], 1):.2f} |")


if __name__ == "__main__":
    main()
