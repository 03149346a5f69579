"""Low-precision storage of trained weights: 16-bit values at rest, fp32 update math, seeded rounding.

ZO2's "AMP mode" (Wang et al., 2025, https://arxiv.org/abs/2503.12668) keeps offloaded blocks in a
16-bit dtype in CPU memory and computes on an fp32 copy on the device, halving the CPU memory and the
transfer bytes of the blocks. Writing an updated fp32 value back to bf16 with round-to-nearest loses
every update smaller than half a bf16 spacing (a weight of 0.02 has spacing 1.2e-4, a ZO update
lr * g * z is ~1e-6), so training stalls. Stochastic rounding keeps each update in expectation. Its
random bits are a pure function of (run seed, step, parameter name), like z, so resumed, replayed and
distributed runs round identically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ROUNDINGS = ("stochastic", "nearest")


def rounding_seed(run_seed: int, step: int, name: str) -> int:
    """The 63-bit seed of the rounding of parameter ``name`` after step ``step``'s update.

    Derived like :func:`zoft.zo.perturb.derive_seed` but from a distinct string, so the rounding
    bits never coincide with a direction's z.
    """
    digest = hashlib.blake2b(f"{run_seed}:{step}:round:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def round_to_dtype(
    x: torch.Tensor, dtype: torch.dtype, rounding: str = "stochastic", seed: int | None = None
) -> torch.Tensor:
    """``x`` (fp32) rounded to the 16-bit ``dtype``; returns a tensor of ``dtype``.

    ``nearest`` is ``x.to(dtype)`` (round to nearest, ties to even). ``stochastic`` rounds to one of
    the two representable neighbours ``lo <= x <= hi``: to ``hi`` when ``u < (x - lo) / (hi - lo)``,
    with ``u = torch.rand(x.shape, generator=torch.Generator(x.device).manual_seed(seed))``, so the
    expected result is ``x`` (up to u's 2^-24 grid). Values that are representable, infinite or NaN,
    and values whose other neighbour would overflow, are returned as ``nearest`` would. The bits of
    u depend on the device type (as z does: a CUDA run rounds like a CUDA run).

    Args:
        x: fp32 values.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        rounding: ``"stochastic"`` or ``"nearest"``.
        seed: the seed of u (required for ``stochastic``), e.g. :func:`rounding_seed`.

    Raises:
        ValueError: an unknown rounding or dtype, a non-fp32 ``x``, or no seed for stochastic rounding.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"storage dtype must be bfloat16 or float16, got {dtype}")
    if x.dtype != torch.float32:
        raise ValueError(f"rounding to {dtype} starts from float32 values, got {x.dtype}")
    nearest = x.to(dtype)
    if rounding == "nearest":
        return nearest
    if seed is None:
        raise ValueError("stochastic rounding needs a seed")
    near = nearest.float()
    diff = x - near  # exact: near is within half a 16-bit spacing of x
    # The other neighbour is one step of the 16-bit magnitude away from near. Both dtypes are
    # sign-magnitude with magnitudes ordered like their bit patterns, so that step is +-1 on the
    # int16 view; from +-0 it is the smallest subnormal with x's sign (-0 is 0x8000, +1 gives 0x8001).
    away_from_zero = (near == 0) | ((diff > 0) == (near > 0))
    bits = nearest.view(torch.int16)
    other = torch.where(away_from_zero, bits + 1, bits - 1).view(dtype).float()
    lo, hi = torch.minimum(near, other), torch.maximum(near, other)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    # hi - lo is a power of two and x - lo is exact, so the fraction is exact.
    rounded = torch.where(u < (x - lo) / (hi - lo), hi, lo).to(dtype)
    keep = (diff == 0) | ~torch.isfinite(near) | ~torch.isfinite(other)
    return torch.where(keep, nearest, rounded)


@torch.no_grad()
def round_(x: torch.Tensor, dtype: torch.dtype, rounding: str = "stochastic", seed: int | None = None) -> torch.Tensor:
    """Round the fp32 tensor ``x`` in place to values representable in ``dtype`` (it stays fp32); returns ``x``."""
    return x.copy_(round_to_dtype(x, dtype, rounding, seed))


@torch.no_grad()
def round_updated_(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, rounding: str, run_seed: int, step: int
) -> None:
    """Round each named fp32 tensor in place after step ``step``'s update, seeded by its name.

    This is the one rounding rule of low-precision storage: ZO2 offloading calls it on the resident
    copy of each updated parameter, ``zoft replay`` on the rebuilt weights, so both agree bit for bit.
    """
    for name, t in tensors.items():
        round_(t, dtype, rounding, rounding_seed(run_seed, step, name) if rounding == "stochastic" else None)
