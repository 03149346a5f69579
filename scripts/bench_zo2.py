"""ZO2 offload and DistZO2 ranks vs in-memory MeZO: peak memory and training tokens/s.

Each configuration runs in a fresh process (torchrun for 2 ranks) on the packaged SmolLM2-135M
(30 blocks), random token batches of --batch x --seq, --steps MeZO steps after one warm-up step.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process high-water mark
(VmHWM, reset after loading), per rank. On a CPU-only machine "offload" copies blocks CPU->CPU:
it measures the code path's overhead only; the upload/compute overlap and the GPU saving need CUDA.
"paired" rows run the +eps and -eps forwards as one forward of the doubled batch (zoft/zo/paired.py,
the default with offload): each block is uploaded once per step instead of twice. z comes from the
generator a recipe gets (``method.z_generator: auto``: Philox through the fused kernels on CUDA, torch
on CPU) unless --z-generator says otherwise. "bf16 model" rows load the model in bf16 and stream it as
stored: no fp32 copies (``method.master_weights: auto``), the update computed in fp32 on the resident
block and rounded back stochastically. DistZO2 rows: PertP and DP on 2 ranks, 2D (2 x 2) on 4, and PertP
with ZO2 offload and sliced uploads on 2; on CUDA a row needing more GPUs than are visible is skipped.

Counted exactly (not timed): block uploads and MiB uploaded per step, passes over each trained tensor
per step by the perturb/update ops (``ZOParameters.weight_passes``: one read and one write of the weight,
e.g. the fused update + perturbation is one), z samplings per tensor per step, and the share of deferred
updates that reached a perturbation's swap-in (fused with philox z).

    PYTHONPATH=$PWD python scripts/bench_zo2.py [--steps 3] [--batch 8] [--seq 64] [--z-generator philox]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from zoft import assets
    from zoft.zo.distributed import DistZO, DistZOConfig
    from zoft.zo.estimate import paired_spsa, spsa
    from zoft.zo.mezo import MeZOOptimizer
    from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer
    from zoft.zo.paired import double_batch
    from zoft.zo.perturb import ZOParameters

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cuda = torch.cuda.is_available()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(dist.get_rank())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.model == "tiny":  # structure only: the exact counts, in seconds (philox on CPU is slow at 135M)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(assets.model_asset_path("smollm2-135m")).eval()
    if "bf16model" in args.config:
        model.to(torch.bfloat16)
    offloader = None
    offload, paired = "offload" in args.config, "paired" in args.config
    if offload:
        # offload.storage_dtype (ZO2's AMP mode): fp32 compute, bf16 storage
        storage = torch.bfloat16 if "bf16storage" in args.config else None
        offloader = BlockOffloader(model, device, "cpu", storage_dtype=storage, sliced=distributed)
    else:
        model.to(device)
    zo = ZOParameters(model, run_seed=0, z_generator=args.z_generator, compute_device=device)
    if offloader is not None:
        opt = DeferredMeZOOptimizer(zo, lr=1e-7, offloader=offloader)
    else:
        opt = MeZOOptimizer(zo, lr=1e-7)
    dzo = DistZO(DistZOConfig(perturbation_parallel=args.pp, checksum_steps=0)) if distributed else None
    g = torch.Generator().manual_seed(0)
    per_rank = args.batch // (dzo.dp if dzo else 1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    if dzo:
        ids = ids[dzo.dp_index * per_rank : (dzo.dp_index + 1) * per_rank]
    ids = ids.to(device)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _hwm_reset()
    estimator = dzo.spsa if dzo else spsa

    def pair_losses():
        logits = model(**double_batch({"input_ids": ids}, ids.shape[0])).logits
        n = ids.shape[0]
        return tuple(model.loss_function(logits=half, labels=ids, vocab_size=model.config.vocab_size)
                     for half in (logits[:n], logits[n:]))

    uploads_before = 0
    for step in range(args.steps + 1):
        if step == 1:  # the first step warms up allocators and caches
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            uploads_before = offloader.uploads if offloader is not None else 0
            bytes_before = offloader.uploaded_bytes if offloader is not None else 0
            passes_before, z_before = zo.weight_passes, zo.z_generations
            fused_before = getattr(opt, "applied_in_forward", 0)
        if paired:
            estimates = paired_spsa(zo, pair_losses, ids.shape[0], step=step, eps=1e-3, seq_len=ids.shape[1])
        else:
            estimates = estimator(zo, lambda: model(input_ids=ids, labels=ids).loss, step=step, eps=1e-3)
        for e in estimates:
            opt.record(step, e)
        opt.step()
    uploads = offloader.uploads - uploads_before if offloader is not None else 0  # before the final flush's
    sent = offloader.uploaded_bytes - bytes_before if offloader is not None else 0
    n_tensors = len(zo.params)
    passes = (zo.weight_passes - passes_before) / (args.steps * n_tensors)
    zs = (zo.z_generations - z_before) / (args.steps * n_tensors)
    fused = (getattr(opt, "applied_in_forward", 0) - fused_before) / (args.steps * n_tensors)
    opt.flush()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _hwm()
    rank = dist.get_rank() if distributed else 0
    result = {"rank": rank, "seconds": elapsed, "peak": peak, "tokens_per_s": args.steps * args.batch * args.seq / elapsed,
              "z_generator": zo.z_generator, "passes": passes, "z": zs, "in_forward": fused,
              "master_mib": sum(t.nbytes for t in zo.masters.values()) / 2**20}
    if offloader is not None:
        result["uploads_per_step"] = uploads / args.steps
        result["upload_mib_per_step"] = sent / args.steps / 2**20
    with open(f"{args.out}.{rank}.json", "w") as fh:
        json.dump(result, fh)
    if distributed:
        del model, opt, zo
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def run_config(name, args, nproc=1, pp=1):
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        return f"skipped: needs {nproc} GPUs, {torch.cuda.device_count()} visible"
    out = f"/tmp/bench_zo2_{os.getpid()}_{name.replace(' ', '_')}"
    base = [__file__, "--worker", "--config", name, "--pp", str(pp), "--z-generator", args.z_generator, "--model", args.model,
            "--out", out, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if nproc > 1:
        env["BENCH_THREADS"] = "1"  # two ranks share the cores one process used
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *base]
    else:
        cmd = [sys.executable, *base]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return [json.load(open(f"{out}.{r}.json")) for r in range(nproc)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--config", default="plain")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", default="/tmp/bench_zo2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--skip-ranks", action="store_true", help="only in-memory vs offload")
    p.add_argument("--z-generator", default="auto", choices=["auto", "torch", "philox"],
                   help="philox on CPU runs the plain-torch Philox reference (slow) to count the fused passes")
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"],
                   help="tiny: a 4-block random Llama, for the exact counts only (pair with --z-generator philox on CPU)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"command: {' '.join(sys.argv)}\ndevice: {device}; torch {torch.__version__}; "
          f"{'SmolLM2-135M' if args.model != 'tiny' else 'a tiny 4-block Llama (counts only)'} (fp32 unless the row "
          f"says bf16), global batch {args.batch} x {args.seq} tokens, {args.steps} timed "
          "MeZO steps\n")
    rows = [("MeZO in memory", run_config("plain", args))]
    rows.append(("MeZO in memory, paired forward", run_config("plain-paired", args)))
    rows.append(("ZO2 offload, two forwards", run_config("offload", args)))
    rows.append(("ZO2 offload, paired forward (default)", run_config("offload-paired", args)))
    rows.append(("ZO2 offload, paired, bf16 block storage", run_config("offload-paired-bf16storage", args)))
    rows.append(("MeZO in memory, bf16 model", run_config("plain-bf16model", args)))
    rows.append(("ZO2 offload, two forwards, bf16 model", run_config("offload-bf16model", args)))
    rows.append(("ZO2 offload, paired, bf16 model", run_config("offload-paired-bf16model", args)))
    if not args.skip_ranks:
        rows.append(("DistZO2 PertP, 2 ranks", run_config("pertp", args, nproc=2, pp=2)))
        rows.append(("DistZO2 DP, 2 ranks", run_config("dp", args, nproc=2, pp=1)))
        rows.append(("DistZO2 2D (PertP 2 x DP 2), 4 ranks", run_config("2d", args, nproc=4, pp=2)))
        rows.append(("DistZO2 PertP + ZO2 offload, sliced uploads, 2 ranks",
                     run_config("pertp-offload", args, nproc=2, pp=2)))
    base = rows[0][1][0]
    print(f"z generator: {base['z_generator']} (method.z_generator: {args.z_generator})\n")
    mem = "GPU peak allocated" if cuda else "peak RSS per rank"
    print(f"| setting | tokens/s | x in-memory | {mem} (MiB) | x in-memory | block uploads / step | MiB uploaded / step | "
          "weight passes / tensor / step | z / tensor / step | updates taken by a perturbation | fp32 masters MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, results in rows:
        if isinstance(results, str):
            print(f"| {name} | {results} | | | | | | | | | |")
            continue
        r0 = results[0]
        tps = r0["tokens_per_s"]
        peak = max(r["peak"] for r in results)
        uploads, mib = r0.get("uploads_per_step"), r0.get("upload_mib_per_step")
        print(f"| {name} | {tps:.0f} | {tps / base['tokens_per_s']:.2f} | {peak / 2**20:.0f} | {peak / base['peak']:.2f} | "
              f"{'-' if uploads is None else f'{uploads:.0f}'} | {'-' if mib is None else f'{mib:.0f}'} | "
              f"{r0['passes']:.2f} | {r0['z']:.2f} | {r0['in_forward']:.2f} | {r0['master_mib']:.0f} |")
    if not cuda:
        print("\nCPU only: offload copies blocks CPU->CPU, so its row is the code path's overhead; the "
              "upload/compute overlap and the GPU memory saving cannot be measured here. The rank rows "
              "share the same cores as the 1-process row (1 thread per rank; 4 ranks oversubscribe 2 cores).")


if __name__ == "__main__":
    main()
