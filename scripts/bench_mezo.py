"""MeZO memory and speed vs inference and first-order fine-tuning, each in a fresh process.

    python scripts/bench_mezo.py                       # SmolLM2-135M, batch 8 x 128, fp32
    python scripts/bench_mezo.py --steps 3 --modes inference,mezo-lora
    python scripts/bench_mezo.py --dtype bfloat16 --modes inference,mezo-full,mezo-full-fp32-masters,mezo-lora

Rows: forward-only inference; zoft MeZO on all weights (Gaussian and Rademacher z) and on LoRA
adapters; HF Trainer AdamW full fine-tune; peft LoRA + AdamW. In bf16/fp16 the MeZO rows use
``method.master_weights: auto`` (fp32 update math, seeded stochastic rounding, no copy) unless the mode
names another policy: ``mezo-full-fp32-masters`` (an fp32 copy of every weight, zoft's default before) or
``mezo-full-nearest`` (``none``: round to nearest). Each mode runs in its own subprocess
on one fixed batch of real text (Rotten Tomatoes reviews), through the same ZoftTrainer /
Trainer step a recipe runs. Peak memory: on CPU the process's peak RSS after the model is loaded
(the kernel's high-water mark is reset after loading); on CUDA torch.cuda.max_memory_allocated.
The MeZO paper's claims to check: memory close to inference, far below Adam; ZO step time /
forward time has a floor of 2.0 (two forwards), the rest is sampling z and passes over weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MODES = ["inference", "mezo-full", "mezo-full-rademacher", "mezo-lora", "adamw-full", "lora-adamw"]
EXTRA_MODES = ["mezo-full-fp32-masters", "mezo-full-nearest"]  # master-weights policies, for half precision


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
            fh.write("5")


def _peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _batch(tokenizer, batch: int, seq: int, device: str):
    import torch

    from zoft.assets import load_data_asset

    texts = load_data_asset("rotten-tomatoes")["text"][: batch * 40]
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"][: batch * seq]
    ids = torch.tensor(ids).view(batch, seq).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from zoft.models import resolve_model_name
    from zoft.trainer import ZoftTrainer
    from zoft.zo.mezo import MeZOConfig

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    path = resolve_model_name(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device)
    mode = args.worker
    if mode in ("mezo-lora", "lora-adamw"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    batch = _batch(tok, args.batch, args.seq, device)
    result = {"mode": mode}

    def forward():
        with torch.no_grad():
            return model(**batch).loss

    if mode == "inference":
        model.eval()
        forward()
        _peak_reset(device)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t)
        result.update(step_s=min(times), forward_s=min(times), peak_mb=_peak_mb(device))
        return result

    zo = None
    if mode.startswith("mezo"):
        master = "fp32" if mode.endswith("fp32-masters") else "none" if mode.endswith("nearest") else "auto"
        zo = MeZOConfig(eps=1e-3, distribution="rademacher" if "rademacher" in mode else "gaussian",
                        master_weights=master)
    targs = TrainingArguments(
        output_dir="/tmp/zoft-bench", learning_rate=1e-6 if zo else 1e-5, report_to="none",
        max_grad_norm=0.0 if zo else 1.0, use_cpu=device == "cpu", disable_tqdm=True,
        optim="adamw_torch",
    )
    trainer = ZoftTrainer(model=model, args=targs, zo=zo)
    trainer.current_gradient_accumulation_steps = 1  # HF sets it inside train(); we call training_step directly
    trainer.create_optimizer()
    opt = trainer.optimizer

    def step():
        trainer.training_step(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocates AdamW state, first-touch pages
    model.eval()
    forward_s = min(_timed(forward) for _ in range(2))
    model.train()
    _peak_reset(device)
    gens0 = trainer.zo_params.z_generations if zo else 0
    passes0 = trainer.zo_params.weight_passes if zo else 0
    times = [_timed(step) for _ in range(args.steps)]
    result.update(step_s=min(times), forward_s=forward_s, peak_mb=_peak_mb(device))
    if zo:
        zp = trainer.zo_params
        n_params = len(zp.params)
        result["z_per_param_per_step"] = (zp.z_generations - gens0) / (args.steps * n_params)
        result["passes_per_param_per_step"] = (zp.weight_passes - passes0) / (args.steps * n_params)
        result["master_mb"] = sum(t.nbytes for t in zp.masters.values()) / 2**20
        result["rounded"] = sorted({mode for _, mode in zp.rounding.values()}) or ["-"]
    return result


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (the minimum is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {MODES + EXTRA_MODES}")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "modes")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"done: {mode}", file=sys.stderr, flush=True)

    base = next((r for r in rows if r["mode"] == "inference"), rows[0])
    unit = "GPU peak MiB (max_memory_allocated)" if "cuda" in str(args.device) else "peak RSS MiB"
    print(f"\nCommand: python scripts/bench_mezo.py {' '.join(sys.argv[1:])}")
    print(f"Device: {platform.machine()} {platform.processor() or ''}, {args.threads} threads; model {args.model} "
          f"{args.dtype}, batch {args.batch} x {args.seq} tokens, min of {args.steps} steps\n")
    print(f"| mode | {unit} | x inference | step s | step / forward | z samples per param per step | "
          "weight passes per param per step | fp32 masters MiB | rounding |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        z = f"{r['z_per_param_per_step']:.0f}" if "z_per_param_per_step" in r else "-"
        passes = f"{r['passes_per_param_per_step']:.0f}" if "passes_per_param_per_step" in r else "-"
        masters = f"{r['master_mb']:.0f}" if "master_mb" in r else "-"
        print(f"| {r['mode']} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} | {r['step_s']:.2f} | "
              f"{r['step_s'] / r['forward_s']:.2f} | {z} | {passes} | {masters} | {'/'.join(r.get('rounded', ['-']))} |")


if __name__ == "__main__":
    main()
