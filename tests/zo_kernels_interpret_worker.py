"""Run the Triton z kernels under TRITON_INTERPRET=1 on CPU and save their outputs for test_zo_kernels.py.

A separate process because the interpreter must be switched on before triton is imported, and must
not leak into other tests. Usage: ``python tests/zo_kernels_interpret_worker.py OUT.pt``.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from zoft.kernels import zo_triton as K  # noqa: E402

SEED_BIG = (1 << 62) + 12345  # a 64-bit kernel argument with a non-zero high key word
SEED_SMALL = 7  # an int32 kernel argument
N = 4_099  # neither a multiple of 4 nor of the 1024-element block
SPLIT = 2_049  # a split that is not a multiple of 4
EPS = 1e-3
UPD_SEEDS = [11, (1 << 40) + 3, 2**63 - 1, 5]
UPD_COEFS = [3e-3, -2e-3, 1.5e-3, 4e-4]
WD = 1e-4
PERT_SEED = 99
ROUND_SEED = (1 << 61) + 77
# wd_coef whose fp32 decay factor is exactly 1.0: an "update" that only rounds (no z is read).
ROUND_ONLY_WD = 1e-12


@triton.jit
def _words_kernel(out_ptr, seed, c_first, n, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < n
    i1, i2, i3, i4 = tl.randint4x(seed, c + c_first)
    tl.store(out_ptr + 4 * c, i1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * c + 1, i2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * c + 2, i3.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * c + 3, i4.to(tl.int32, bitcast=True), mask=m)


@triton.jit
def _randn_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + c, tl.randn(seed, c), mask=c < n)


@triton.jit
def _bits_kernel(out_ptr, seed, c_first, n_c, BLOCK_C: tl.constexpr):
    lc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, 4)[None, :]
    r = K._round_bits(seed, c_first + lc, j)
    idx = lc[:, None] * 4 + j
    tl.store(out_ptr + idx, r.to(tl.int32), mask=idx < 4 * n_c)


def _bits(seed, c_first, n_c):
    out = torch.empty(4 * n_c, dtype=torch.int32)
    _bits_kernel[(triton.cdiv(n_c, 256),)](out, seed, c_first, n_c, BLOCK_C=256)
    return out


def rounding_inputs():
    """fp32 values around every case of the rounding rule: weights, fp16 subnormals, overflow, inf/NaN."""
    g = torch.Generator().manual_seed(4)
    return torch.cat([
        torch.randn(2000, generator=g) * 0.05,
        torch.randn(500, generator=g) * 1e-6,
        torch.randn(200, generator=g) * 1e-9,
        torch.randn(200, generator=g) * 3e4,
        torch.randn(100, generator=g) * 1e-39,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, -65530.0, 70000.0, 2.0**-14 - 2.0**-30, 2.0**-24 * 0.75,
                      3.38e38, 3.3895e38, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")]),
    ]).float()


def _words(seed, c_first, n):
    out = torch.empty(4 * n, dtype=torch.int32)
    _words_kernel[(triton.cdiv(n, 256),)](out, seed, c_first, n, BLOCK=256)
    return out


def _z(seed, n, offset=0, rademacher=False):
    # w = 0, eps = 1 gives z itself in fp32.
    return K.perturbed_copy(torch.zeros(n), seed, 1.0, offset=offset, rademacher=rademacher)


def main(path):
    torch.manual_seed(0)
    r = {}
    r["words_big"] = _words(SEED_BIG, 0, 2_500)
    r["words_hi"] = _words(SEED_SMALL, 2**32 - 1_000, 2_500)  # counters cross 2**32
    randn = torch.empty(2_500)
    _randn_kernel[(triton.cdiv(2_500, 256),)](randn, SEED_BIG, 2_500, BLOCK=256)
    r["randn_big"] = randn
    r["z_big"] = _z(SEED_BIG, N)
    r["z_small"] = _z(SEED_SMALL, N)
    r["z_far"] = _z(SEED_BIG, N, offset=2**35 + 3)
    r["rad_big"] = _z(SEED_BIG, N, rademacher=True)
    for s in UPD_SEEDS + [PERT_SEED]:
        r[f"z_{s}"] = _z(s, N)
        r[f"rad_{s}"] = _z(s, N, rademacher=True)

    w = torch.randn(N)
    r["w"] = w.clone()
    r["chunk_whole"] = K.perturbed_copy(w, SEED_BIG, EPS)
    r["chunk_parts"] = torch.cat(
        [K.perturbed_copy(w[:SPLIT], SEED_BIG, EPS), K.perturbed_copy(w[SPLIT:], SEED_BIG, EPS, offset=SPLIT)]
    )

    master = w.clone()
    r["plus_bf16"] = K.perturbed_copy(master, SEED_BIG, EPS, out=torch.empty(N, dtype=torch.bfloat16))
    r["minus_bf16"] = K.perturbed_copy(master, SEED_BIG, -EPS, out=torch.empty(N, dtype=torch.bfloat16))
    r["plus_f32"] = K.perturbed_copy(master, SEED_BIG, EPS)
    r["minus_f32"] = K.perturbed_copy(master, SEED_BIG, -EPS)
    r["master_after"] = master

    # (storage dtype, out dtype, number of directions, rademacher)
    for name, wdt, odt, k, rad in [
        ("f32_f32_k2", torch.float32, torch.float32, 2, False),
        ("f32_bf16_k4", torch.float32, torch.bfloat16, 4, False),
        ("bf16_bf16_k1", torch.bfloat16, torch.bfloat16, 1, False),
        ("f32_f16_k3_rad", torch.float32, torch.float16, 3, True),
    ]:
        args = (UPD_SEEDS[:k], UPD_COEFS[:k], WD)
        fused_w, fused_out = w.clone().to(wdt), torch.empty(N, dtype=odt)
        K.fused_update_perturb(fused_w, *args, PERT_SEED, EPS, fused_out, rademacher=rad)
        unfused_w = K.fused_update_perturb(w.clone().to(wdt), *args, rademacher=rad)
        unfused_out = K.perturbed_copy(unfused_w, PERT_SEED, EPS, torch.empty(N, dtype=odt), rademacher=rad)
        r[f"fused_{name}"] = (fused_w, fused_out, unfused_w, unfused_out)

    # Stochastic rounding in the kernel: its bits, the rule on special values, and a rounded update fused
    # with both perturbed copies of the paired forward.
    r["bits"] = _bits(ROUND_SEED, 0, 1_001)
    r["bits_far"] = _bits(ROUND_SEED, 2**33 + 1, 1_001)  # an odd first counter, past 2**32
    x = rounding_inputs()
    with np.errstate(over="ignore", invalid="ignore"):
        for dt in (torch.bfloat16, torch.float16):
            tag = str(dt).removeprefix("torch.")
            kw = dict(round_dtype=dt, round_seed=ROUND_SEED)
            r[f"sr_f32w_{tag}"] = K.fused_update_perturb(x.clone(), [], [], ROUND_ONLY_WD, **kw)
            r[f"sr_nearest_{tag}"] = K.fused_update_perturb(x.clone(), [], [], ROUND_ONLY_WD, round_dtype=dt)
            for wdt, k in ((dt, 2), (torch.float32, 3)):
                wk = w.clone().mul_(0.05).to(wdt)
                plus, minus = torch.empty(N, dtype=dt), torch.empty(N, dtype=dt)
                K.fused_update_perturb(wk, UPD_SEEDS[:k], UPD_COEFS[:k], WD, PERT_SEED, EPS, plus, rademacher=True,
                                       out_minus=minus, **kw)
                sep_plus = K.perturbed_copy(wk, PERT_SEED, EPS, torch.empty(N, dtype=dt), rademacher=True)
                sep_minus = K.perturbed_copy(wk, PERT_SEED, -EPS, torch.empty(N, dtype=dt), rademacher=True)
                r[f"sr_fused_{tag}_{str(wdt).removeprefix('torch.')}"] = (wk, plus, minus, sep_plus, sep_minus)
        r["pair_only_w"] = w.clone()
        po, pm = torch.empty(N, dtype=torch.bfloat16), torch.empty(N, dtype=torch.bfloat16)
        K.fused_update_perturb(r["pair_only_w"], [], [], 0.0, PERT_SEED, EPS, po, out_minus=pm)
        r["pair_only"] = (po, pm)

    r["axpy_f16_rad"] = K.axpy_z_(w.half(), SEED_BIG, 0.25, rademacher=True)
    r["axpy_f32"] = K.axpy_z_(w.clone(), SEED_BIG, 0.25)

    special = torch.tensor(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.3e38, 3.4e38, -3.4e38,
         1e-40, -1e-39, float("inf"), float("-inf"), float("nan"), 65504.0, 2.5e-5]
    )
    special = torch.cat([special, torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))])
    r["special_in"] = special
    r["special_bf16"] = K.perturbed_copy(special, SEED_BIG, 0.0, out=torch.empty(len(special), dtype=torch.bfloat16))
    with np.errstate(over="ignore"):  # values beyond fp16's range become inf, as intended
        r["special_f16"] = K.perturbed_copy(
            special, SEED_BIG, 0.0, out=torch.empty(len(special), dtype=torch.float16)
        )
    torch.save(r, path)


if __name__ == "__main__":
    main(sys.argv[1])
