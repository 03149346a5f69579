"""Benchmark WTA-CRS on the real SmolLM2-135M: saved activations, peak memory, step time, loss.

Causal-LM loss on Rotten Tomatoes review texts packed into rows of ``--seq`` tokens (no padding: with
padding, p ∝ ||x_i|| would spend the budget on pad tokens whose gradient is zero), AdamW, fp32, CPU.
Each configuration runs in a fresh subprocess so peak memory (VmHWM) is not polluted by the previous one.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python scripts/bench_wta_crs.py            # ~4 min on 2 CPU cores
    PYTHONPATH=$PWD python scripts/bench_wta_crs.py --steps 2 --modes lora      # quicker

``--variance``: the gradient-estimate error instead (issue 15), for a fixed *padded* batch of reviews
(right padding to the longest, labels -100 on padding). The exact weight gradients of the replaced layers
(full fine-tuning of the target weights, the rest frozen) against WTA-CRS estimates over ``--seeds`` forward
seeds, with p ∝ ||x_i|| (no cache) and with ``GradNormCache`` (p ∝ ||x_i|| ||g_i||, norms from a previous
visit of the same batch). ``--stale-steps K`` takes K AdamW steps on other batches between that visit and
the measurement, so the cached norms are older than the weights, as after an epoch of training.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python scripts/bench_wta_crs.py --variance --seeds 24

Columns: ``rel. MSE`` = mean over seeds of sum_l ||G^_l - G_l||^2 / sum_l ||G_l||^2 (the estimator's
variance relative to the gradient's size); ``rel. bias`` = ||mean_seeds G^ - G|| / ||G||, next to what an
unbiased estimator gives, sqrt(rel. MSE / seeds); ``pad share`` = fraction of the kept rows that are
padding positions (the batch's padding fraction is printed above the table).

Columns: ``saved act.`` = bytes of the distinct tensors the autograd graph keeps after one forward
(``saved_tensors_hooks``, parameters excluded); ``peak`` = process VmHWM minus the resident size right
before the first step (activations + gradients + AdamW state + temporaries); ``max batch`` = how many
rows of ``--seq`` tokens fit in ``--act-budget-gib`` of saved activations (extrapolated linearly from
the measured bytes per row, not run); ``eval loss`` = loss on a held-out packed batch after the steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

# WTA-CRS targets for HF Llama with SDPA attention (see docs/wta_crs.md): o_proj's input is SDPA's saved
# output, so replacing it would add a sampled copy instead of freeing anything.
TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def packed_batches(tokenizer, texts, rows, seq):
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= rows * seq:
            break
    import torch

    return torch.tensor(ids[: rows * seq]).view(rows, seq)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def worker(cfg: dict) -> dict:
    import torch
    from torch.autograd.graph import saved_tensors_hooks
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoft.assets import load_data_asset, model_asset_path
    from zoft.memory.wta_crs import apply_wta_crs

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    path = model_asset_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    texts = load_data_asset("rotten-tomatoes").shuffle(seed=0)["text"]
    b, seq, steps = cfg["batch"], cfg["seq"], cfg["steps"]
    data = packed_batches(tok, texts, b * (steps + 1), seq)
    train, held_out = data[: b * steps].split(b), data[b * steps :]

    if cfg["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        )
        lr = 5e-4
    else:
        lr = 5e-5
    replaced = apply_wta_crs(model, cfg["ratio"], TARGETS) if cfg["ratio"] < 1.0 else []
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    base_kib = rss_kib("VmRSS")
    times, losses, act_bytes = [], [], 0
    for step, batch in enumerate(train):
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        t0 = time.perf_counter()
        if step == 0:
            with saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=batch, labels=batch).loss
            act_bytes = sum(storages.values())
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak_kib = rss_kib("VmHWM")
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(input_ids=held_out, labels=held_out).loss)
    return {
        **cfg,
        "replaced": len(replaced),
        "act_bytes": act_bytes,
        "peak_over_base_mib": (peak_kib - base_kib) / 1024,
        "vmhwm_mib": peak_kib / 1024,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "losses": losses,
        "eval_loss": eval_loss,
    }


def padded_batch(tokenizer, texts, rows):
    """``rows`` reviews with EOS, right-padded to the longest; labels -100 on padding."""
    import torch

    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts[:rows]]
    longest = max(len(x) for x in seqs)
    ids = torch.full((rows, longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(rows, longest, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def variance_run(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zoft.memory.wta_crs as wta
    from zoft.assets import load_data_asset, model_asset_path

    torch.set_num_threads(args.threads)
    path = model_asset_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    texts = load_data_asset("rotten-tomatoes").shuffle(seed=0)["text"]
    batch = padded_batch(tok, texts, args.batch)
    pad = batch["attention_mask"] == 0
    model.requires_grad_(False)
    weights = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            m.weight.requires_grad_(True)
            weights[name] = m.weight

    def grads(b):
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        return {n: w.grad for n, w in weights.items()}

    # Which rows each sample keeps (to count padding in it); the layers call sample_rows for every sample.
    kept_pad, kept_all = [0], [0]
    real_sample_rows = wta.sample_rows

    def counting_sample_rows(x, ratio, grad_norm=None, generator=None):
        out = real_sample_rows(x, ratio, grad_norm, generator)
        if out is not None and x.shape[:2] == pad.shape:
            kept_pad[0] += int(pad.reshape(-1)[out[1]].sum())
            kept_all[0] += out[1].numel()
        return out

    wta.sample_rows = counting_sample_rows

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"device: CPU ({platform.processor() or platform.machine()}, {args.threads} threads), torch {torch.__version__}; "
        f"SmolLM2-135M fp32, one batch of {args.batch} reviews padded to {pad.shape[1]} tokens "
        f"({pad.float().mean():.0%} padding), {len(weights)} weights ({', '.join(TARGETS)}), {args.seeds} seeds, "
        f"cache {args.stale_steps} AdamW steps old\n"
    )
    print("| ratio | sampling | rel. MSE | vs no cache | rel. bias | unbiased would give | pad share |")
    print("|---|---|---|---|---|---|---|")
    for ratio in args.ratios:
        results = {}
        for use_cache in (False, True):
            state = {n: w.detach().clone() for n, w in weights.items()}
            cache = wta.GradNormCache() if use_cache else None
            if use_cache:  # the previous visit: records this batch's output-gradient norms
                wta.apply_wta_crs(model, ratio, TARGETS, grad_norm_cache=cache)
                torch.manual_seed(1000)
                grads(batch)
                wta.remove_wta_crs(model)
            if args.stale_steps:  # exact gradients: both settings reach the same weights
                opt = torch.optim.AdamW(list(weights.values()), lr=args.stale_lr)
                others = packed_batches(tok, texts[args.batch :], args.stale_steps * 4, 64).split(4)
                for other in others:
                    grads({"input_ids": other, "labels": other})
                    opt.step()
            exact = {n: g.clone() for n, g in grads(batch).items()}
            wta.apply_wta_crs(model, ratio, TARGETS, grad_norm_cache=cache)
            if cache is not None:  # the previous visit's norms, kept as they are for every seed
                assert len(cache) > 0
                cache.refresh = False
            norm2 = sum(float(g.pow(2).sum()) for g in exact.values())
            mean = {n: torch.zeros_like(g) for n, g in exact.items()}
            errs = []
            kept_pad[0] = kept_all[0] = 0
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                est = grads(batch)
                errs.append(sum(float((est[n] - exact[n]).pow(2).sum()) for n in exact) / norm2)
                for n in exact:
                    mean[n] += est[n] / args.seeds
            wta.remove_wta_crs(model)
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(state[n])  # the same starting weights for the other setting
            bias = math.sqrt(sum(float((mean[n] - exact[n]).pow(2).sum()) for n in exact) / norm2)
            mse = statistics.fmean(errs)
            results[use_cache] = mse
            print(
                f"| {ratio:g} | {'p ∝ ‖x‖ ‖g‖ (cache)' if use_cache else 'p ∝ ‖x‖ (no cache)'} | {mse:.4f} | "
                f"{mse / results[False]:.2f} | {bias:.4f} | {math.sqrt(mse / args.seeds):.4f} | "
                f"{kept_pad[0] / max(kept_all[0], 1):.2f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--act-budget-gib", type=float, default=2.0)
    ap.add_argument("--variance", action="store_true", help="gradient-estimate error with/without GradNormCache")
    ap.add_argument("--seeds", type=int, default=24, help="--variance: forward seeds per setting")
    ap.add_argument("--stale-steps", type=int, default=0, help="--variance: AdamW steps between cache and measure")
    ap.add_argument("--stale-lr", type=float, default=1e-4, help="--variance: their learning rate")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variance:
        if args.ratios == [1.0, 0.3, 0.1]:
            args.ratios = [0.3, 0.1]
        variance_run(args)
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"device: CPU ({platform.processor() or platform.machine()}, {args.threads} threads), torch {torch.__version__}; "
        f"SmolLM2-135M fp32, batch {args.batch} x {args.seq} packed tokens, AdamW, {args.steps} steps\n"
    )
    results = []
    for mode in args.modes:
        for ratio in args.ratios:
            cfg = dict(
                mode=mode, ratio=ratio, batch=args.batch, seq=args.seq, steps=args.steps, threads=args.threads
            )
            t0 = time.time()
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(cfg)],
                capture_output=True,
                text=True,
                env=os.environ,
            )
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"config {cfg} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[-1][len("RESULT ") :])
            results.append(res)
            print(f"  {mode} ratio {ratio}: done in {time.time() - t0:.0f} s", flush=True)

    print(
        "\n| mode | ratio | layers | saved act. MiB | vs exact | peak MiB | vs exact | step s | vs exact "
        f"| max batch @ {args.act_budget_gib:g} GiB act. | train loss (steps) | eval loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        rows = [r for r in results if r["mode"] == mode]
        ref = next((r for r in rows if r["ratio"] == 1.0), rows[0])
        for r in rows:
            per_row = r["act_bytes"] / r["batch"]
            max_batch = int(args.act_budget_gib * 2**30 // per_row)
            print(
                f"| {mode} | {r['ratio']:g} | {r['replaced']} | {r['act_bytes'] / 2**20:.0f} | "
                f"{r['act_bytes'] / ref['act_bytes']:.2f} | {r['peak_over_base_mib']:.0f} | "
                f"{r['peak_over_base_mib'] / ref['peak_over_base_mib']:.2f} | {r['step_s']:.2f} | "
                f"{r['step_s'] / ref['step_s']:.2f} | {max_batch} | "
                f"{' '.join(f'{x:.3f}' for x in r['losses'])} | {r['eval_loss']:.4f} |"
            )


if __name__ == "__main__":
    main()
