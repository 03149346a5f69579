"""Benchmark FlashDP against Opacus (per-layer clipping) and non-private training: throughput and peak memory.

Every (setting, method) runs in a fresh subprocess on the same model, batch and seed, so peak RSS is
that config's own. Settings:
  lora    the real SmolLM2-135M-Instruct with LoRA (r=8 on q/k/v/o), batch B x T tokens
  fullft  full fine-tuning of a small Llama built from a config (untied embeddings: FlashDP needs
          one owner per parameter), so per-sample gradients of every weight matter
Methods: nonprivate (AdamW), flashdp (attach_flashdp + DPOptimizer, sigma=1), opacus
(GradSampleModule + DPPerLayerOptimizer, clipping per layer, sigma=1; what PrivacyEngine.make_private
builds with clipping="per_layer", minus its data loader). Peak memory is VmHWM after resetting the
high-water mark once the model is loaded (it includes the model itself; "+MB" is the rise above it).

    python scripts/bench_flashdp.py [--settings lora fullft] [--steps 3] [--batch 4] [--seq 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

METHODS = ("nonprivate", "flashdp", "opacus")


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(setting: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if setting == "lora":
        from peft import LoraConfig, get_peft_model

        from zoft.assets import model_asset_path

        model = AutoModelForCausalLM.from_pretrained(model_asset_path("smollm2-135m"), dtype=torch.float32)
        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
        return model, model.config.vocab_size if hasattr(model.config, "vocab_size") else 49152
    cfg = LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg), cfg.vocab_size


def worker(setting: str, method: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, vocab = _build(setting)
    model.train()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(trainable, lr=1e-5)
    info: dict = {"trainable": sum(p.numel() for p in trainable)}
    loaded_mb = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    if method == "nonprivate":
        run_model, opt = model, inner
    elif method == "flashdp":
        from zoft.privacy import DPOptimizer, attach_flashdp

        handle = attach_flashdp(model, total_bound=1.0)
        run_model = model
        opt = DPOptimizer(inner, handle, noise_multiplier=1.0, expected_batch_size=batch)
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPPerLayerOptimizer

        run_model = GradSampleModule(model, loss_reduction="mean")
        per_layer = 1.0 / len(trainable) ** 0.5
        opt = DPPerLayerOptimizer(
            inner, noise_multiplier=1.0, max_grad_norm=[per_layer] * len(trainable),
            expected_batch_size=batch, loss_reduction="mean",
        )  # fmt: skip

    def step():
        opt.zero_grad()
        run_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    step()  # warm-up: allocator, optimizer state
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    if method == "flashdp":
        paths: dict[str, int] = {}
        for p in handle.paths.values():
            paths[p] = paths.get(p, 0) + 1
        info["paths"] = paths
    info.update(
        tokens_per_s=batch * seq * steps / elapsed,
        s_per_step=elapsed / steps,
        peak_mb=_rss_mb("VmHWM"),
        loaded_mb=loaded_mb,
    )
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["lora", "fullft"], choices=["lora", "fullft"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--worker", nargs=2, metavar=("SETTING", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], args.batch, args.seq, args.steps)))
        return

    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 2)")
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after 1 warm-up, sigma 1, "
          "total clip bound 1 split evenly per layer\n")  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for setting in args.settings:
        results = {}
        for method in METHODS:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", setting, method,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                results[method] = {"error": tail[0][:120]}
            else:
                results[method] = json.loads(line[0][7:])
            print(f"  {setting}/{method}: {results[method]}", flush=True)
        rows.append((setting, results))

    print("\n| setting | method | trainable params | tokens/s | s/step | throughput vs non-private "
          "| peak RSS MB | +MB over loaded | peak vs non-private | FlashDP paths |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting, results in rows:
        base = results.get("nonprivate", {})
        for method in METHODS:
            r = results[method]
            if "error" in r:
                print(f"| {setting} | {method} | - | failed: {r['error']} | | | | | | |")
                continue
            tput = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else float("nan")
            mem = r["peak_mb"] / base["peak_mb"] if "peak_mb" in base else float("nan")
            paths = ", ".join(f"{k}: {v}" for k, v in r.get("paths", {}).items()) or "-"
            print(f"| {setting} | {method} | {r['trainable']:,} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} "
                  f"| {tput:.2f}x | {r['peak_mb']:.0f} | {r['peak_mb'] - r['loaded_mb']:.0f} | {mem:.2f}x "
                  f"| {paths} |")  # fmt: skip


if __name__ == "__main__":
    main()
