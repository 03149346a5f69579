"""Plain-torch reference of the fused zeroth-order perturb/update kernels (and their CPU fallback).

ZO2 ("ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models with Limited GPU
Memory", 2025, https://arxiv.org/abs/2503.12668) fuses the update of step t into the perturbation of
step t+1 so each weight is read and written once per step, and generates the random direction z from
a seed instead of storing it. This module defines z exactly as the Triton kernels in ``zo_triton``
draw it, with Philox4x32-10 written in int64 torch ops, so a z is the same on any device and the
kernels have a bit-level reference. It saves nothing by itself; it is the definition and the fallback.

The z stream of a seed: element ``e`` of the stream is output word ``e % 4`` of Philox4x32-10 at
counter ``(e // 4, 0, 0, 0)`` with key ``(seed & 0xFFFFFFFF, seed >> 32)`` -- i.e. Triton's
``tl.randn4x(seed, e // 4)[e % 4]`` for the Gaussian and the sign bit of
``tl.randint4x(seed, e // 4)[e % 4]`` for the Rademacher direction. Using all four Philox words
(rather than ``tl.randn``, which keeps one of four) makes z four times cheaper to generate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ZoftError

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_ROUND_DTYPES = (torch.bfloat16, torch.float16)
# Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011), as in triton/language/random.py.
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
# Triton's uint->[0, 1) scale: the largest float whose product with INT32_MAX stays below 1.0.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_U1_FLOOR = 1.0e-7
# Counters per batch of torch ops: large enough that per-op overhead does not dominate (measured
# best at 2**16-2**18 on a 2-core CPU), small enough to bound the fallback's temporaries (~10 MB).
_CHUNK_COUNTERS = 1 << 16
SEED_MAX = (1 << 63) - 1


def check_seed(seed: int) -> int:
    """Return ``seed`` as an int after checking it is a valid 63-bit Philox key.

    Raises:
        ZoftError: the seed is not an integer in [0, 2**63).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ZoftError(f"z seed {seed!r} is not an integer in [0, 2**63); derive seeds as 63-bit non-negative ints")
    return int(seed)


def _mul_hi_lo(x: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``const * x`` for uint32 values held in int64, without int64 overflow."""
    # Split the constant into 16-bit halves so each partial product stays below 2**48.
    p_lo = x * (const & _MASK16)
    t = (x * (const >> 16)).add_(p_lo >> 16)
    hi = t >> 16
    lo = t.bitwise_and_(_MASK16).bitwise_left_shift_(16).bitwise_or_(p_lo.bitwise_and_(_MASK16))
    return hi, lo


def philox4x32(seed: int, counters: torch.Tensor, n_rounds: int = N_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 at counters ``(c, 0, 0, 0)`` with key ``(seed_lo, seed_hi)``, as ``tl.randint4x``.

    Args:
        seed: 63-bit non-negative seed; its low and high 32-bit halves are the Philox key.
        counters: int64 tensor of counters in [0, 2**64); the low word is ``c & 0xFFFFFFFF`` and
            the second word ``c >> 32`` (zero below 2**32, so int32 and int64 offsets agree).
        n_rounds: Philox rounds (10 as in Triton).

    Returns:
        Four int64 tensors holding the uint32 output words.
    """
    seed = check_seed(seed)
    c0 = counters & _MASK32
    zero = torch.zeros_like(c0)
    return _philox_rounds(c0, counters >> 32, zero, zero.clone(), seed & _MASK32, seed >> 32, n_rounds)


def _philox_rounds(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = N_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 rounds on counter words c0..c3 (uint32 in int64 tensors) with key (k0, k1)."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = hi_a.bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 words in int64: read as int32, fold negatives, scale."""
    # ~x of a negative int32 equals the uint32 pattern xor 0xFFFFFFFF; the result is in [0, 2**31).
    folded = torch.where(x >= (1 << 31), x ^ _MASK32, x)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal`` with each fp32 step correctly rounded.

    log/sqrt/cos/sin run in float64 and round once to fp32: torch's fp32 versions are not correctly
    rounded (and differ between CPU and CUDA), so this keeps z device-independent to the last bit
    but for rare double-rounding ties. The products stay in fp32 as in the kernel.
    """
    u1 = torch.clamp_min(u1, _U1_FLOOR)
    th = (u2 * _TWO_PI).double()
    log_u1 = torch.log(u1.double()).float()
    r = torch.sqrt((log_u1 * -2.0).double()).float()
    return r * torch.cos(th).float(), r * torch.sin(th).float()


def _z_for_counters(seed: int, counters: torch.Tensor, rademacher: bool) -> torch.Tensor:
    """The 4 z values of each counter, shape (len(counters), 4), fp32."""
    words = philox4x32(seed, counters)
    if rademacher:
        # Sign bit of the int32 word: negative -> -1, else +1.
        return torch.stack([1.0 - 2.0 * (w >> 31).to(torch.float32) for w in words], dim=1)
    u = [_uniform(w) for w in words]
    n1, n2 = _box_muller(u[0], u[1])
    n3, n4 = _box_muller(u[2], u[3])
    return torch.stack([n1, n2, n3, n4], dim=1)


def philox_z(
    seed: int,
    numel: int,
    device: torch.device | str | None = None,
    *,
    offset: int = 0,
    rademacher: bool = False,
) -> torch.Tensor:
    """Elements ``[offset, offset + numel)`` of the z stream of ``seed`` (see the module docstring).

    Args:
        seed: 63-bit non-negative seed.
        numel: number of elements.
        device: where to compute and return z (the values do not depend on it beyond the last bit
            of ``log``/``cos``/``sin``).
        offset: index of the first element in the stream; z of a tensor split into pieces is the
            same as z of the whole when each piece passes its start as ``offset``.
        rademacher: +-1 signs instead of N(0, 1).

    Returns:
        A flat fp32 tensor of ``numel`` values.
    """
    check_offset(offset)
    if numel < 0:
        raise ZoftError(f"philox_z got numel={numel}; it must be >= 0")
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, 4 * _CHUNK_COUNTERS):
        stop = min(numel, start + 4 * _CHUNK_COUNTERS)
        out[start:stop] = _z_slice(seed, offset + start, stop - start, device, rademacher)
    return out


def _z_slice(seed: int, first: int, count: int, device: torch.device, rademacher: bool) -> torch.Tensor:
    c_first, c_last = first // 4, (first + count - 1) // 4
    counters = torch.arange(c_first, c_last + 1, dtype=torch.int64, device=device)
    z = _z_for_counters(seed, counters, rademacher).reshape(-1)
    skip = first - 4 * c_first
    return z[skip:skip + count]


def philox_randn(seed: int, numel: int, device: torch.device | str | None = None, *, offset: int = 0) -> torch.Tensor:
    """N(0, 1) z of ``seed``: ``philox_z(seed, numel, device, offset=offset)``."""
    return philox_z(seed, numel, device, offset=offset)


def philox_rademacher(
    seed: int, numel: int, device: torch.device | str | None = None, *, offset: int = 0
) -> torch.Tensor:
    """+-1 z of ``seed``: ``philox_z(seed, numel, device, offset=offset, rademacher=True)``."""
    return philox_z(seed, numel, device, offset=offset, rademacher=True)


# -- stochastic rounding (the rule is documented in zoft.zo.lowprec) --------------------------------------


def philox_bits(seed: int, numel: int, device: torch.device | str | None = None, *, offset: int = 0) -> torch.Tensor:
    """Elements ``[offset, offset + numel)`` of the Philox rounding stream of ``seed``, int32 in [0, 65536).

    Element ``e``: 16-bit half ``e % 2`` (low first) of word ``(e // 2) % 4`` of Philox4x32-10 at counter
    ``e // 8`` (one Philox call feeds 8 elements; z takes one call per 4).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if numel == 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    first, last = offset // 8, (offset + numel - 1) // 8
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(seed, counters), dim=1)  # (counters, 4) uint32 in int64
    halves = torch.stack([words & _MASK16, words >> 16], dim=2).reshape(-1)
    skip = offset - 8 * first
    return halves[skip : skip + numel].to(torch.int32)


def round_stored(acc: torch.Tensor, round_dtype: torch.dtype | None, round_seed: int | None, offset: int) -> torch.Tensor:
    """The updated fp32 values ``acc`` (elements ``offset...`` of a tensor) rounded to ``round_dtype``.

    ``round_dtype`` None: returned as they are (the caller casts to the weight's dtype, to nearest).
    ``round_seed`` None: to nearest; else stochastically with ``philox_bits(round_seed, ..., offset)``.
    """
    if round_dtype is None:
        return acc
    if round_seed is None:
        return acc.to(round_dtype)
    return stochastic_round(acc, round_dtype, philox_bits(round_seed, acc.numel(), acc.device, offset=offset))


def _step_magnitude(bits: torch.Tensor, delta: int) -> torch.Tensor:
    # 16-bit floats are sign-magnitude with magnitudes ordered like their bit patterns, so +-1 on the int16
    # view moves one representable value away from / toward zero for either sign (-0 is 0x8000; +1 gives
    # the smallest subnormal with the minus sign).
    return bits + delta


def _stochastic_generic(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """The rounding rule computed from the neighbours (any 16-bit dtype); the reference the fast paths match."""
    near = x.to(dtype)
    near_f = near.float()
    ax = x.abs()
    nbits = near.view(torch.int16)
    toward_bits = torch.where(near_f.abs() > ax, _step_magnitude(nbits, -1), nbits).to(torch.int16)
    toward = toward_bits.view(dtype)
    away = _step_magnitude(toward_bits, 1).to(torch.int16).view(dtype)
    t, a = toward.float().abs(), away.float().abs()
    # Past the largest finite value the next one is infinity, taken as one spacing further (IEEE overflow):
    # the spacing is then the one below t, which is t's binade's.
    below = _step_magnitude(toward_bits, -1).to(torch.int16).view(dtype).float().abs()
    spacing = torch.where(torch.isinf(a), t - below, a - t)
    # |x| - |t| is exact (Sterbenz, or t = 0) and the spacing is a power of two, so frac is exact.
    frac = (ax - t) / spacing
    u_complement = 1.0 - r.to(torch.float32) * (1.0 / 65536)  # exact: 16-bit grid
    rounded = torch.where(frac >= u_complement, away, toward)
    return torch.where(torch.isfinite(x), rounded, near)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` with bits ``r``; a tensor of ``dtype``.

    The rule (``zoft.zo.lowprec``): ``t`` is ``x`` rounded toward zero, ``a`` its neighbour away from zero
    (infinity past the largest finite value, one spacing further), ``frac = (|x| - |t|) / (|a| - |t|)``;
    ``a`` when ``frac >= 1 - r / 65536``, else ``t``; infinities and NaN stay as they are.

    Args:
        x: fp32 values (left unchanged).
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        r: int32 tensor of ``x``'s element count, values in [0, 65536) (e.g. :func:`philox_bits`).
    """
    if dtype != torch.bfloat16:
        return _stochastic_generic(x, dtype, r.view(x.shape))
    # bf16 is the upper half of fp32: adding r to the low half carries into the upper half exactly when
    # frac >= 1 - r / 65536, also from the largest finite value into infinity, and leaves infinities and the
    # NaNs arithmetic produces (0x7FC00000, 0xFFC00000) as they are. Arithmetic shift of the int32 view keeps
    # the sign bits of negative values. (A NaN whose payload fills the high mantissa bits could wrap to +-0.)
    bits = x.view(torch.int32) + r.view(x.shape)
    return bits.bitwise_right_shift_(16).to(torch.int16).view(torch.bfloat16)


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(t: torch.Tensor, name: str) -> None:
    """Raise ZoftError unless ``t`` is a contiguous fp32/bf16/fp16 tensor."""
    if not isinstance(t, torch.Tensor):
        raise ZoftError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ZoftError(f"{name} has dtype {t.dtype}; the z kernels take float32, bfloat16 or float16 storage")
    if not t.is_contiguous():
        raise ZoftError(f"{name} is not contiguous; pass .contiguous() storage (z is indexed by flat offset)")


def check_offset(offset: int) -> int:
    """Raise ZoftError unless ``offset`` (z index of a tensor's first element) is a non-negative int."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ZoftError(f"offset {offset!r} must be a non-negative int (the z index of the tensor's first element)")
    return offset


def check_out(w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
    """Check ``out`` matches ``w`` in element count and device."""
    if out is None:
        return None
    check_tensor(out, "out")
    if out.numel() != w.numel() or out.device != w.device:
        raise ZoftError(
            f"out has {out.numel()} elements on {out.device}, w has {w.numel()} on {w.device}; "
            "they must match in size and device"
        )
    return out


def check_directions(upd_seeds: Sequence[int], upd_coefs: Sequence[float]) -> tuple[list[int], list[float]]:
    """Validate the update directions: 0..4 (seed, coefficient) pairs."""
    seeds, coefs = [check_seed(s) for s in upd_seeds], [float(c) for c in upd_coefs]
    if len(seeds) != len(coefs) or len(seeds) > 4:
        raise ZoftError(
            f"got {len(seeds)} update seeds and {len(coefs)} coefficients; pass equal lists of at most 4 "
            "(apply more directions in several calls)"
        )
    for c in coefs:
        if not math.isfinite(c):
            raise ZoftError(f"update coefficient {c} is not finite; check the projected gradient and lr")
    return seeds, coefs


def _chunks(numel: int):
    step = 4 * _CHUNK_COUNTERS
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def perturbed_copy(
    w: torch.Tensor,
    seed: int,
    eps: float,
    out: torch.Tensor | None = None,
    *,
    offset: int = 0,
    rademacher: bool = False,
) -> torch.Tensor:
    """``out = w + eps * z(seed)`` computed in fp32 and stored in ``out``'s dtype (plain torch).

    Args:
        w: contiguous fp32/bf16/fp16 tensor (e.g. an fp32 master).
        seed: 63-bit z seed.
        eps: perturbation scale.
        out: destination with ``w``'s element count (any of the three dtypes; may be ``w`` itself).
            A new tensor of ``w``'s dtype and shape when None.
        offset: z stream index of ``w``'s first element.
        rademacher: +-1 z instead of N(0, 1).

    Returns:
        ``out``.

    Raises:
        ZoftError: bad dtype, layout, size or seed.
    """
    check_tensor(w, "w")
    seed = check_seed(seed)
    check_offset(offset)
    out = torch.empty_like(w) if out is None else check_out(w, out)
    wf, of = w.view(-1), out.view(-1)
    eps32 = torch.tensor(float(eps), dtype=torch.float32, device=w.device)
    # Chunked so the fallback never holds a full-size z (or fp32 copy) of a large tensor.
    for a, b in _chunks(wf.numel()):
        z = _z_slice(seed, offset + a, b - a, w.device, rademacher)
        of[a:b] = (wf[a:b].to(torch.float32) + z * eps32).to(of.dtype)
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
    """ZO update of ``w`` in place, optionally fused with the next step's perturbed copy (plain torch).

    In fp32: ``w_new = w * (1 - wd_coef) - sum_k upd_coefs[k] * z(upd_seeds[k])`` (terms subtracted
    in order), rounded to ``round_dtype`` (see below) and stored to ``w``. If ``out`` is given,
    ``out = w_new' + pert_eps * z(pert_seed)`` where ``w_new'`` is ``w_new`` as stored in ``w``, so the
    fused call equals the update followed by ``perturbed_copy(w, pert_seed, pert_eps, out)`` bit for bit;
    ``out_minus`` (with ``out``) gets ``w_new' - pert_eps * z(pert_seed)`` from the same z, equal to
    ``perturbed_copy`` with ``-pert_eps``. With no directions and no decay ``w`` is only read.

    Args:
        w: contiguous fp32/bf16/fp16 tensor updated in place (a half-precision weight, an fp32 master, or
            the fp32 resident copy of a block stored in 16 bits).
        upd_seeds: 0 to 4 seeds of the directions of the update.
        upd_coefs: their coefficients (e.g. ``lr * projected_grad / n``), same length.
        wd_coef: decoupled weight decay factor (``lr * weight_decay``).
        pert_seed: seed of the next perturbation; required when ``out`` is given.
        pert_eps: scale of the next perturbation.
        out: destination of the perturbed copy, or None for the update alone.
        offset: z stream index of ``w``'s first element (same for all seeds and the rounding bits).
        rademacher: +-1 z instead of N(0, 1).
        out_minus: destination of the ``-pert_eps`` copy (the paired forward), or None.
        round_dtype: ``torch.bfloat16`` / ``torch.float16``: round the updated value to this dtype before
            storing it (exact in ``w``'s dtype); None: cast to ``w``'s dtype (to nearest).
        round_seed: with ``round_dtype``, the seed of stochastic rounding bits (``philox_bits``); None: to
            nearest.

    Returns:
        ``w``.

    Raises:
        ZoftError: bad dtype, layout, size, seed, more than 4 directions, or a rounding dtype wider than
            ``w``'s.
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
    check_offset(offset)
    dev = w.device
    update = bool(seeds) or float(wd_coef) != 0.0
    decay = torch.tensor(1.0 - float(wd_coef), dtype=torch.float32, device=dev)
    coefs32 = [torch.tensor(c, dtype=torch.float32, device=dev) for c in coefs]
    eps32 = torch.tensor(float(pert_eps), dtype=torch.float32, device=dev)
    neg_eps32 = torch.tensor(-float(pert_eps), dtype=torch.float32, device=dev)
    wf = w.view(-1)
    of = None if out is None else out.view(-1)
    om = None if out_minus is None else out_minus.view(-1)
    for a, b in _chunks(wf.numel()):
        if update:
            acc = wf[a:b].to(torch.float32) * decay
            for s, c in zip(seeds, coefs32):
                acc = acc - _z_slice(s, offset + a, b - a, dev, rademacher) * c
            stored = round_stored(acc, round_dtype, round_seed, offset + a).to(w.dtype)
            wf[a:b] = stored
        else:
            stored = wf[a:b]
        if of is not None:
            z = _z_slice(pert_seed, offset + a, b - a, dev, rademacher)
            base = stored.to(torch.float32)
            of[a:b] = (base + z * eps32).to(of.dtype)
            if om is not None:
                om[a:b] = (base + z * neg_eps32).to(om.dtype)
    return w


def check_rounding(w: torch.Tensor, round_dtype: torch.dtype | None, round_seed: int | None) -> None:
    """Raise ZoftError unless ``round_dtype`` is None or a 16-bit dtype no wider than ``w``'s (and the seed valid)."""
    if round_dtype is None:
        if round_seed is not None:
            raise ZoftError("fused_update_perturb got round_seed without round_dtype; pass the dtype to round to")
        return
    if round_dtype not in _ROUND_DTYPES:
        raise ZoftError(f"round_dtype {round_dtype} is not bfloat16 or float16")
    if w.dtype not in (torch.float32, round_dtype):
        raise ZoftError(f"w of dtype {w.dtype} cannot hold {round_dtype} values exactly; round to {w.dtype} or use fp32 w")
    if round_seed is not None:
        check_seed(round_seed)
