"""Triton kernels that perturb and update weights with a seeded z generated in registers.

ZO2 ("ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models with Limited GPU
Memory", 2025, https://arxiv.org/abs/2503.12668) fuses the ZO update of step t with the perturbation
of step t+1. These kernels do that in one read and one write of the weights, drawing z from Philox
on the fly (``tl.randn4x`` / ``tl.randint4x``), so no z tensor is ever written to memory: a
perturbation costs one pass over the weights instead of three (generate z, read it, add it).

z is defined in ``zo_reference`` (element ``e`` = word ``e % 4`` of Philox at counter ``e // 4``);
the plain-torch functions there are the reference these kernels match. Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly), which is how they are tested
without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..errors import ZoftError
from .zo_reference import check_directions, check_offset, check_out, check_rounding, check_seed, check_tensor

# Counters per program: 256 counters = 1024 elements, 4 Philox words each.
_BLOCK_C = 256
_SEED_ARGS = ["seed", "c_first", "skip", "s0", "s1", "s2", "s3", "pseed", "rseed"]
# round_dtype codes of the update kernel (a compile-time constant).
_ROUND_NONE, _ROUND_BF16, _ROUND_FP16 = 0, 1, 2


@triton.jit
def _z_block(seed, c, j, RADEMACHER: tl.constexpr):
    """z of the (len(c), 4) elements 4*c + j: word j of Philox at counter c."""
    if RADEMACHER:
        i1, i2, i3, i4 = tl.randint4x(seed, c)
        z1 = tl.where(i1.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)
        z2 = tl.where(i2.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)
        z3 = tl.where(i3.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)
        z4 = tl.where(i4.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)
    else:
        z1, z2, z3, z4 = tl.randn4x(seed, c)
    # Selecting by lane keeps one Philox call per 4 elements (tl.randn would spend one per element).
    return tl.where(
        j == 0, z1[:, None], tl.where(j == 1, z2[:, None], tl.where(j == 2, z3[:, None], z4[:, None]))
    )


@triton.jit
def _store_cast(x, dtype: tl.constexpr):
    """fp32 -> storage dtype with round-to-nearest-even, identical on GPU and in the interpreter."""
    if dtype == tl.bfloat16:
        # The interpreter truncates fp32->bf16 and mishandles subnormals (GPUs round to nearest
        # even), so build the bf16 bits with integer ops: identical everywhere, and cheap.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = tl.where(x != x, (u >> 16) | 0x40, r)  # NaN stays a quiet NaN of the same sign
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _bf16_nearest_f32(x):
    """``_store_cast(x, bf16)`` as fp32 values, by integer ops only (the interpreter's bf16 -> fp32 cast
    mishandles subnormals)."""
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
    r = tl.where(x != x, ((u >> 16) | 0x40) << 16, r)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _tile(c_first, skip, n, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Counters, lanes, element indices and mask of this program's (BLOCK_C, 4) tile."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    lc = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, 4)[None, :]
    idx = lc[:, None] * 4 + j - skip
    mask = (idx >= 0) & (idx < n)
    return c_first + lc, j, idx, mask


@triton.jit(do_not_specialize=_SEED_ARGS)
def _perturbed_copy_kernel(
    w_ptr, out_ptr, n, c_first, skip, seed, eps,
    RADEMACHER: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    c, j, idx, mask = _tile(c_first, skip, n, BLOCK_C, INT64)
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    z = _z_block(seed, c, j, RADEMACHER)
    tl.store(out_ptr + idx, _store_cast(w + eps * z, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_bits(rseed, c, j):
    """Rounding integers in [0, 65536) of the elements 4*c + j: 16-bit half e % 2 of word (e // 2) % 4 of
    Philox at counter e // 8 (e = 4c + j), as ``zo_reference.philox_bits``."""
    r1, r2, r3, r4 = tl.randint4x(rseed, c >> 1)
    w = 2 * (c & 1)[:, None] + (j >> 1)
    word = tl.where(w == 0, r1[:, None], tl.where(w == 1, r2[:, None], tl.where(w == 2, r3[:, None], r4[:, None])))
    return tl.where((j & 1) == 0, word & 0xFFFF, word >> 16)


@triton.jit
def _stochastic_bf16(x, r):
    """``zo_reference.stochastic_round`` to bf16 (as fp32 values): add r to the fp32 bits, drop the low 16.
    Carries into infinity past the largest finite value; leaves infinities and computed NaNs as they are."""
    t = ((x.to(tl.uint32, bitcast=True) + r) >> 16) << 16  # literals above 2**31 would widen to int64
    return t.to(tl.float32, bitcast=True)


@triton.jit
def _stochastic_fp16(x, r):
    """``zo_reference.stochastic_round`` to fp16 (as fp32 values): 13 dropped bits for fp16 normals (65536 and
    beyond become infinity), multiples of 2^-24 below 2^-14; infinities and NaN stay."""
    u = x.to(tl.uint32, bitcast=True)
    mag = u & 0x7FFFFFFF
    sign = (u >> 31) << 31
    normal = (((mag + (r >> 3)) & 0x7FFFE000) | sign).to(tl.float32, bitcast=True)
    normal = tl.where(tl.abs(normal) >= 65536.0, normal * float("inf"), normal)
    scaled = tl.abs(x) * 16777216.0
    q = tl.floor(scaled)
    up = (scaled - q) >= 1.0 - r.to(tl.float32) * (1.0 / 65536.0)
    sub = (q + tl.where(up, 1.0, 0.0)) * (1.0 / 16777216.0)
    sub = tl.where(sign != 0, -sub, sub)
    val = tl.where(mag < 0x38800000, sub, normal)
    return tl.where(mag >= 0x7F800000, x, val)


@triton.jit(do_not_specialize=_SEED_ARGS)
def _update_perturb_kernel(
    w_ptr, out_ptr, out2_ptr, n, c_first, skip,
    s0, s1, s2, s3, a0, a1, a2, a3, decay, pseed, peps, rseed,
    NUM_UPD: tl.constexpr, UPDATE: tl.constexpr, HAS_OUT: tl.constexpr, HAS_OUT2: tl.constexpr,
    ROUND: tl.constexpr, ROUND_SR: tl.constexpr,
    RADEMACHER: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    c, j, idx, mask = _tile(c_first, skip, n, BLOCK_C, INT64)
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if UPDATE:
        acc = w * decay
        if NUM_UPD > 0:
            acc = acc - _z_block(s0, c, j, RADEMACHER) * a0
        if NUM_UPD > 1:
            acc = acc - _z_block(s1, c, j, RADEMACHER) * a1
        if NUM_UPD > 2:
            acc = acc - _z_block(s2, c, j, RADEMACHER) * a2
        if NUM_UPD > 3:
            acc = acc - _z_block(s3, c, j, RADEMACHER) * a3
        if ROUND == 1:
            if ROUND_SR:
                acc = _stochastic_bf16(acc, _round_bits(rseed, c, j))
            else:
                acc = _bf16_nearest_f32(acc)
        elif ROUND == 2:
            if ROUND_SR:
                acc = _stochastic_fp16(acc, _round_bits(rseed, c, j))
            else:
                acc = acc.to(tl.float16).to(tl.float32)
        new = _store_cast(acc, w_ptr.dtype.element_ty)
        tl.store(w_ptr + idx, new, mask=mask)
        w = new.to(tl.float32)
    if HAS_OUT:
        # Perturb the value as stored, so fused == update followed by perturbed_copy in any dtype.
        z = _z_block(pseed, c, j, RADEMACHER)
        tl.store(out_ptr + idx, _store_cast(w + z * peps, out_ptr.dtype.element_ty), mask=mask)
        if HAS_OUT2:
            tl.store(out2_ptr + idx, _store_cast(w + z * (-peps), out2_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch_geometry(w: torch.Tensor, offset: int) -> tuple[tuple[int], int, int, bool]:
    if w.device.type != "cuda" and not _interpreting():
        raise ZoftError(
            f"the Triton z kernels need a CUDA tensor, got one on {w.device}; use zo_ops(device) to get the "
            "torch path, or set TRITON_INTERPRET=1 to run the kernels on CPU"
        )
    check_offset(offset)
    n = w.numel()
    c_first, skip = offset // 4, offset % 4
    n_counters = (offset + n - 1) // 4 - c_first + 1
    grid = (triton.cdiv(n_counters, _BLOCK_C),)
    # int32 indices overflow past 2**31 elements; counters below 2**32 give the same z either way.
    int64 = n + 4 * _BLOCK_C >= 2**31
    return grid, c_first, skip, int64


def perturbed_copy(
    w: torch.Tensor,
    seed: int,
    eps: float,
    out: torch.Tensor | None = None,
    *,
    offset: int = 0,
    rademacher: bool = False,
) -> torch.Tensor:
    """``out = w + eps * z(seed)``: one read of ``w``, one write of ``out``, z never in memory.

    Args:
        w: contiguous fp32/bf16/fp16 tensor on CUDA (e.g. an fp32 master).
        seed: 63-bit z seed.
        eps: perturbation scale.
        out: destination with ``w``'s element count, any of the three dtypes (e.g. the bf16 compute
            copy); may be ``w`` itself. A new tensor like ``w`` when None.
        offset: z stream index of ``w``'s first element.
        rademacher: +-1 z instead of N(0, 1).

    Returns:
        ``out``.

    Raises:
        ZoftError: bad dtype, layout, size, seed, or a non-CUDA tensor outside the interpreter.
    """
    check_tensor(w, "w")
    seed = check_seed(seed)
    out = torch.empty_like(w) if out is None else check_out(w, out)
    if w.numel() == 0:
        return out
    grid, c_first, skip, int64 = _launch_geometry(w, offset)
    _perturbed_copy_kernel[grid](
        w, out, w.numel(), c_first, skip, seed, float(eps),
        RADEMACHER=bool(rademacher), BLOCK_C=_BLOCK_C, INT64=int64,
    )
    return out


def axpy_z_(w: torch.Tensor, seed: int, coef: float, *, offset: int = 0, rademacher: bool = False) -> torch.Tensor:
    """In place ``w += coef * z(seed)`` (fp32 math, stored in ``w``'s dtype). Returns ``w``."""
    return perturbed_copy(w, seed, coef, out=w, offset=offset, rademacher=rademacher)


def fused_update_perturb(
    w: torch.Tensor,
    upd_seeds: Sequence[int],
    upd_coefs: Sequence[float],
    wd_coef: float = 0.0,
    pert_seed: int | None = None,
    pert_eps: float = 0.0,
    out: torch.Tensor | None = None,
    *,
    offset: int = 0,
    rademacher: bool = False,
    out_minus: torch.Tensor | None = None,
    round_dtype: torch.dtype | None = None,
    round_seed: int | None = None,
) -> torch.Tensor:
    """ZO update of ``w`` in place, fused with the next step's perturbed copies: one read, one write of ``w``.

    In fp32: ``w_new = w * (1 - wd_coef) - sum_k upd_coefs[k] * z(upd_seeds[k])``, rounded to
    ``round_dtype`` (stochastically with Philox bits of ``round_seed``, in registers) and stored to ``w``;
    if ``out`` is given, also ``out = w_new' + pert_eps * z(pert_seed)`` with ``w_new'`` the value
    stored in ``w`` (so fused equals update-then-``perturbed_copy`` exactly), and ``out_minus`` the
    ``-pert_eps`` copy from the same z. With no directions and no decay ``w`` is only read.

    Args:
        w: contiguous fp32/bf16/fp16 CUDA tensor updated in place (a half-precision weight, an fp32
            master, or the fp32 resident copy of a block stored in 16 bits).
        upd_seeds: 0 to 4 direction seeds (a compile-time count: one kernel variant per count).
        upd_coefs: their coefficients, e.g. ``lr * projected_grad / n``.
        wd_coef: decoupled weight decay factor (``lr * weight_decay``).
        pert_seed: seed of the next perturbation; required when ``out`` is given.
        pert_eps: scale of the next perturbation.
        out: destination of the perturbed copy (e.g. the bf16 compute weights), or None.
        offset: z stream index of ``w``'s first element.
        rademacher: +-1 z instead of N(0, 1).
        out_minus: destination of the ``-pert_eps`` copy (the paired forward), or None.
        round_dtype: bf16/fp16 to round the updated value to before storing; None: cast to ``w``'s dtype.
        round_seed: with ``round_dtype``, the seed of the stochastic rounding bits; None: to nearest.

    Returns:
        ``w``.

    Raises:
        ZoftError: bad dtype, layout, size, seed, more than 4 directions, ``out`` aliasing ``w``,
            a bad rounding, or a non-CUDA tensor outside the interpreter.
    """
    check_tensor(w, "w")
    seeds, coefs = check_directions(upd_seeds, upd_coefs)
    out = check_out(w, out)
    out_minus = check_out(w, out_minus)
    if out is not None:
        if pert_seed is None:
            raise ZoftError("fused_update_perturb got out but no pert_seed; pass the next step's seed")
        pert_seed = check_seed(pert_seed)
        if out.data_ptr() == w.data_ptr():
            raise ZoftError("fused_update_perturb: out is w itself; pass a separate compute copy, or out=None")
    elif out_minus is not None:
        raise ZoftError("fused_update_perturb got out_minus without out; pass both perturbed copies")
    check_rounding(w, round_dtype, round_seed)
    update = bool(seeds) or float(wd_coef) != 0.0
    if w.numel() == 0 or (not update and out is None):
        return w
    grid, c_first, skip, int64 = _launch_geometry(w, offset)
    s = seeds + [0] * (4 - len(seeds))
    a = coefs + [0.0] * (4 - len(coefs))
    kind = {None: _ROUND_NONE, torch.bfloat16: _ROUND_BF16, torch.float16: _ROUND_FP16}[round_dtype]
    _update_perturb_kernel[grid](
        w, w if out is None else out, w if out_minus is None else out_minus, w.numel(), c_first, skip,
        s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3],
        1.0 - float(wd_coef), 0 if pert_seed is None else pert_seed, float(pert_eps),
        0 if round_seed is None else round_seed,
        NUM_UPD=len(seeds), UPDATE=update, HAS_OUT=out is not None, HAS_OUT2=out_minus is not None,
        ROUND=kind, ROUND_SR=round_seed is not None,
        RADEMACHER=bool(rademacher), BLOCK_C=_BLOCK_C, INT64=int64,
    )
    return w
