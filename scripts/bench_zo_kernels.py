"""Time z generation + perturbation: the naive torch.randn path vs the Philox reference and the Triton kernels.

Prints a markdown table of time per element (and GB/s on CUDA) with ratios against the naive path
(``z = torch.randn(...)``, then ``w += eps * z``), run in the same process. On CPU it times the torch
paths only; the Triton rows need CUDA and are skipped with a note. Peak extra memory per row: the
process high-water mark on CPU (VmHWM after a reset, each case in a fresh process),
``max_memory_allocated`` on CUDA.

    PYTHONPATH=$PWD python scripts/bench_zo_kernels.py [--numel N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zoft.kernels import zo_reference as R  # noqa: E402

EPS = 1e-3
SEEDS = [11, 12, 13, 14]


def _cpu_hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _time(fn, device: torch.device, repeats: int) -> tuple[float, int]:
    """Best wall time of ``repeats`` calls after one warm-up, and the peak extra memory of one call."""
    if device.type == "cpu":
        # Reset before the first call: later calls reuse memory the allocator kept, hiding the peak.
        _cpu_hwm_reset()
        base = _cpu_hwm_bytes()
        fn()
        peak = max(0, _cpu_hwm_bytes() - base)
    else:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best, peak
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, peak


def _cpu_cases(n: int):
    w = torch.randn(n)
    g = torch.Generator().manual_seed(0)
    zbuf = torch.empty(n)

    def naive():
        z = torch.randn(n, generator=g)
        w.add_(z, alpha=EPS)

    def naive_buffer():  # MeZO's in-place normal_ into a reused buffer
        zbuf.normal_(generator=g)
        w.add_(zbuf, alpha=EPS)

    def rademacher_torch():
        z = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
        w.add_(z, alpha=EPS)

    def philox_gen():
        R.philox_randn(1, n)

    def philox_axpy():
        R.axpy_z_(w, 1, EPS)

    def philox_rad():
        R.axpy_z_(w, 1, EPS, rademacher=True)

    out_bf16 = torch.empty(n, dtype=torch.bfloat16)

    def naive_update_perturb():  # unfused: update with one direction, then next perturbed bf16 copy
        w.mul_(1 - 1e-6).add_(torch.randn(n, generator=g), alpha=-1e-6)
        out_bf16.copy_(w + EPS * torch.randn(n, generator=g))

    def philox_update_perturb():
        R.fused_update_perturb(w, SEEDS[:1], [1e-6], 1e-6, 99, EPS, out_bf16)

    # bytes: the minimum traffic of the operation itself (read w, write w / out), for GB/s
    return [
        ("naive: torch.randn z + w.add_", naive, 8 * n),
        ("naive, reused buffer: z.normal_() + w.add_", naive_buffer, 8 * n),
        ("torch Rademacher: randint z + w.add_", rademacher_torch, 8 * n),
        ("Philox reference: z only (philox_randn)", philox_gen, 4 * n),
        ("Philox reference: axpy_z_ (N(0,1))", philox_axpy, 8 * n),
        ("Philox reference: axpy_z_ (Rademacher)", philox_rad, 8 * n),
        ("naive: update(k=1) then bf16 perturbed copy", naive_update_perturb, 10 * n),
        ("Philox reference: fused_update_perturb(k=1, bf16 out)", philox_update_perturb, 10 * n),
    ]


def _rows_cpu(n: int, repeats: int, threads: int) -> list[tuple[str, str, float, int, int]]:
    """Each case in a fresh process, so its memory high-water mark is its own."""
    rows = []
    for i in range(len(_cpu_cases(16))):
        cmd = [sys.executable, os.path.abspath(__file__), "--numel", str(n), "--repeats", str(repeats),
               "--threads", str(threads), "--cpu-case", str(i)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(tuple(json.loads(res.stdout.strip().splitlines()[-1])))
    return rows


def _run_cpu_case(i: int, n: int, repeats: int) -> None:
    name, fn, byts = _cpu_cases(n)[i]
    t, peak = _time(fn, torch.device("cpu"), repeats)
    print(json.dumps([name, "cpu", t, peak, byts]))


def _rows_cuda(n: int, repeats: int) -> list[tuple[str, str, float, int, int]]:
    from zoft.kernels import zo_triton as T

    dev = torch.device("cuda")
    w = torch.randn(n, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    out_bf16 = torch.empty(n, device=dev, dtype=torch.bfloat16)
    rows = []

    def naive():
        w.add_(torch.randn(n, device=dev, generator=g), alpha=EPS)

    def naive_copy_bf16():
        out_bf16.copy_(w + EPS * torch.randn(n, device=dev, generator=g))

    def naive_update_perturb(k):
        def fn():
            w.mul_(1 - 1e-6)
            for _ in range(k):
                w.add_(torch.randn(n, device=dev, generator=g), alpha=-1e-6)
            out_bf16.copy_(w + EPS * torch.randn(n, device=dev, generator=g))
        return fn

    def fused(k):
        return lambda: T.fused_update_perturb(w, SEEDS[:k], [1e-6] * k, 1e-6, 99, EPS, out_bf16)

    for name, fn, byts in [
        ("naive: torch.randn z + w.add_", naive, 8 * n),
        ("Triton axpy_z_ (N(0,1))", lambda: T.axpy_z_(w, 1, EPS), 8 * n),
        ("Triton axpy_z_ (Rademacher)", lambda: T.axpy_z_(w, 1, EPS, rademacher=True), 8 * n),
        ("naive: bf16 perturbed copy of fp32 master", naive_copy_bf16, 6 * n),
        ("Triton perturbed_copy fp32 -> bf16", lambda: T.perturbed_copy(w, 1, EPS, out_bf16), 6 * n),
        ("Philox reference on CUDA: axpy_z_", lambda: R.axpy_z_(w, 1, EPS), 8 * n),
        ("naive: update(k=1) then bf16 perturbed copy", naive_update_perturb(1), 10 * n),
        ("Triton fused_update_perturb(k=1, bf16 out)", fused(1), 10 * n),
        ("naive: update(k=4) then bf16 perturbed copy", naive_update_perturb(4), 10 * n),
        ("Triton fused_update_perturb(k=4, bf16 out)", fused(4), 10 * n),
    ]:
        t, peak = _time(fn, dev, repeats)
        rows.append((name, "cuda", t, peak, byts))
    return rows


def _print_table(rows, n: int) -> None:
    print("| path | device | ns / element | GB/s (min traffic) | x naive randn+add | peak extra MiB |")
    print("|---|---|---:|---:|---:|---:|")
    base = {}
    for name, dev, t, _, _ in rows:
        if name.startswith("naive: torch.randn"):
            base[dev] = t
    for name, dev, t, peak, byts in rows:
        ratio = t / base[dev] if dev in base else float("nan")
        print(f"| {name} | {dev} | {t / n * 1e9:.2f} | {byts / t / 1e9:.1f} | {ratio:.2f} | {peak / 2**20:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 20, help="elements per tensor on CPU (default 1M)")
    ap.add_argument("--cuda-numel", type=int, default=1 << 28, help="elements per tensor on CUDA (default 268M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--cpu-case", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_case is not None:
        _run_cpu_case(args.cpu_case, args.numel, args.repeats)
        return
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    rows = _rows_cpu(args.numel, args.repeats, args.threads)
    print(f"\n### CPU, {args.numel:,} fp32 elements, best of {args.repeats}\n")
    _print_table(rows, args.numel)
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            print("\nCUDA present but triton does not import: Triton rows skipped.")
            return
        print(f"\n### CUDA: {torch.cuda.get_device_name()}, {args.cuda_numel:,} fp32 elements, best of {args.repeats}\n")
        _print_table(_rows_cuda(args.cuda_numel, args.repeats), args.cuda_numel)
    else:
        print("\nNo CUDA device: the Triton kernel rows (and GB/s on GPU) are skipped; run this script on a "
              "GPU machine unchanged to get them.")


if __name__ == "__main__":
    main()
