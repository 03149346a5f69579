"""Weight memory, peak RSS, forward time and quantization error of NF4Linear on SmolLM2-135M (CPU).

Each configuration runs in a fresh subprocess: fp32, bf16 (plain transformers), nf4 (zoft NF4Linear loaded
from a bitsandbytes NF4 checkpoint written by save_quantized; fp32 compute) and nf4-bf16 (same, bf16
compute and bf16 embeddings/norms), and bnb-nf4 (bitsandbytes' own Linear4bit quantizing the fp32 model at
load, its CPU kernels; a reference for the quantization error and speed). Every worker runs the same
forward passes at batch 8 x 128 over a fixed
slice of Rotten Tomatoes reviews and reports loss / perplexity, so the quantization error shows as the
perplexity change against fp32. A "runtime" row measures the process with torch and transformers
imported and no model, the floor under every RSS figure.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python scripts/bench_quant4bit.py [--batches 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("runtime", "fp32", "bf16", "nf4", "nf4-bf16", "bnb-nf4")
BATCH, SEQ = 8, 128


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(config: str, model_path: str, nf4_path: str, tokens_path: str) -> dict:
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from zoft.zo import quant4bit as q

    torch.set_num_threads(2)
    tokens = torch.load(tokens_path, weights_only=True)
    t0 = time.perf_counter()
    if config == "runtime":
        model = None
    elif config in ("fp32", "bf16"):
        dtype = torch.float32 if config == "fp32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    elif config == "bnb-nf4":
        from transformers import BitsAndBytesConfig

        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb_config).eval()
    else:
        dtype = torch.float32 if config == "nf4" else torch.bfloat16
        model = q.load_quantized(nf4_path, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    gc.collect()
    weight = q.quantized_weight_bytes(model) if model is not None else {"total": 0, "codes": 0, "scales": 0}
    if config == "bnb-nf4":  # bitsandbytes keeps absmax in a QuantState, not in a parameter or buffer
        states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
        weight["scales"] = sum(s.absmax.numel() * s.absmax.element_size() for s in states)
        weight["total"] += weight["scales"]
    rss_loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times, losses = [], []
    if model is not None:
        with torch.inference_mode():
            for batch in tokens:
                t = time.perf_counter()
                logits = model(batch).logits
                times.append(time.perf_counter() - t)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
                )
                losses.append(loss.item())
                del logits
    peak = _status("VmHWM")
    timed = times[1:] or times  # the first forward pays one-time allocation costs
    return {
        "config": config,
        "weight_bytes": weight["total"],
        "codes": weight["codes"],
        "scales": weight["scales"],
        "load_s": load_s,
        "rss_loaded": rss_loaded,
        "peak_rss": peak,
        "forward_s": sum(timed) / len(timed) if timed else float("nan"),
        "loss": sum(losses) / len(losses) if losses else float("nan"),
    }


def prepare(work: Path, batches: int) -> tuple[str, str, str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoft.assets import load_data_asset, model_asset_path
    from zoft.zo import quant4bit as q

    torch.set_num_threads(2)
    model_path = model_asset_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_path)
    test = load_data_asset("rotten-tomatoes").train_test_split(test_size=0.1, seed=0)["test"]
    # Concatenate reviews into one stream and cut it into full 128-token rows: no padding to mask.
    ids: list[int] = []
    for text in test["text"]:
        ids.extend(tok(text + "\n")["input_ids"])
        if len(ids) >= batches * BATCH * SEQ:
            break
    tokens = torch.tensor(ids[: batches * BATCH * SEQ]).reshape(batches, BATCH, SEQ)
    tokens_path = str(work / "tokens.pt")
    torch.save(tokens, tokens_path)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    q.quantize_model_nf4(model)
    nf4_path = str(work / "nf4")
    q.save_quantized(model, nf4_path, tokenizer=tok)
    return model_path, nf4_path, tokens_path, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="forward passes of 8 x 128 tokens per config")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, *args.paths)), flush=True)
        return

    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(
        f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        "torch threads 2); model SmolLM2-135M-Instruct; data Rotten Tomatoes test split (seed 0)"
    )
    with tempfile.TemporaryDirectory(prefix="zoft-bench-q4-") as tmp:
        model_path, nf4_path, tokens_path, quant_s = prepare(Path(tmp), args.batches)
        print(f"quantize + save_quantized of the fp32 model: {quant_s:.1f} s")
        results = {}
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--worker", config, "--paths", model_path, nf4_path, tokens_path]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"worker {config} failed:\n{proc.stderr[-3000:]}")
            results[config] = json.loads(line[len("RESULT ") :])

    mb = 1 / 2**20
    base, floor = results["fp32"], results["runtime"]["peak_rss"]
    print(
        f"\n{args.batches} forwards of {BATCH} x {SEQ} tokens per config (time: mean of all but the first); "
        f"RSS of the runtime alone (torch + transformers imported, no model): {floor * mb:.0f} MB\n"
    )
    print(
        "| config | weight MB | x fp32 | RSS loaded MB | peak RSS MB | x fp32 "
        "| peak above runtime MB | x fp32 | forward s | x fp32 | load s | loss | ppl |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config in CONFIGS[1:]:
        r = results[config]
        above, base_above = r["peak_rss"] - floor, base["peak_rss"] - floor
        print(
            f"| {config} | {r['weight_bytes'] * mb:.1f} | {r['weight_bytes'] / base['weight_bytes']:.3f} "
            f"| {r['rss_loaded'] * mb:.0f} | {r['peak_rss'] * mb:.0f} "
            f"| {r['peak_rss'] / base['peak_rss']:.2f} "
            f"| {above * mb:.0f} | {above / base_above:.2f} "
            f"| {r['forward_s']:.2f} | {r['forward_s'] / base['forward_s']:.2f} | {r['load_s']:.1f} "
            f"| {r['loss']:.4f} | {math.exp(r['loss']):.2f} |"
        )
    nf4 = results["nf4"]
    print(
        f"\nnf4 weights: codes {nf4['codes'] * mb:.1f} MB + scales {nf4['scales'] * mb:.1f} MB + the rest "
        f"(embeddings tied to lm_head, norms; kept in full precision) "
        f"{(nf4['weight_bytes'] - nf4['codes'] - nf4['scales']) * mb:.1f} MB"
    )


if __name__ == "__main__":
    main()
