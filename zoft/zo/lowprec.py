"""Half-precision weights without fp32 copies: fp32 update math, seeded stochastic rounding back.

A zeroth-order update ``lr * g * z`` is ~1e-6, far below half a bf16 spacing for most weights (a weight
of 0.02 has spacing 1.2e-4), so writing the updated value back with round-to-nearest drops it and
training stalls. Keeping an fp32 master of every trained weight fixes that at 4 more bytes per weight
(three times inference memory for bf16 MeZO). Stochastic rounding fixes it at no memory: the fp32
result is rounded up or down at random with the probabilities that make its expectation exact, so
every update survives on average (Zamirai et al., "Revisiting BFloat16 Training", 2020,
https://arxiv.org/abs/2010.06192). The ZO-specific point: the random bits are a pure function of
(run seed, step, parameter name), like z, so resumed, replayed and distributed runs round identically.

The rule, for an fp32 value ``x`` and a 16-bit uniform integer ``r`` in [0, 65536): let ``t`` be ``x``
rounded toward zero to the target dtype and ``a`` the neighbour of ``t`` away from zero (infinity past
the largest finite value, counted one spacing further, as IEEE overflow does); with
``frac = (|x| - |t|) / (|a| - |t|)`` (exact), the result is ``a`` when ``frac >= 1 - r / 65536``, else
``t``. So P(a) = floor(65536 frac) / 65536: exact for bf16 (16 dropped bits) and fp16 normals (13),
within 2^-16 of frac for fp16 subnormals. Representable values, infinities and NaN stay as they are.
For bf16 the rule is the classic bit trick: add ``r`` to the fp32 bit pattern and drop the low 16 bits.

Where ``r`` comes from (:class:`RoundingBits`), seeded by :func:`rounding_seed`:
- ``"philox"``: element ``e`` of a tensor takes the 16-bit half ``e % 2`` (low half first) of word
  ``(e // 2) % 4`` of Philox4x32-10 at counter ``e // 8``, keyed by the seed: the same numbers on every
  device (the fused Triton kernels draw them in registers), so a philox run replays anywhere.
- ``"torch"``: 64-bit words of a ``torch.Generator`` on the tensor's device, four 16-bit lanes each,
  drawn in element order; cheap on CPU, but the numbers differ between CPU and CUDA (as torch z does).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch

from zoft.kernels.zo_reference import philox_bits, stochastic_round

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ROUNDINGS = ("stochastic", "nearest")
BITS_GENERATORS = ("torch", "philox")
# Elements per chunk of a rounded update: the fp32 accumulator and the bits of one chunk are the only
# temporaries beyond z (1 MiB + 0.5 MiB, cache-sized), and chunks are long enough that per-op overhead
# stays small.
CHUNK = 1 << 18
_HALF_DTYPES = (torch.bfloat16, torch.float16)
__all__ = [
    "BITS_GENERATORS", "CHUNK", "ROUNDINGS", "STORAGE_DTYPES", "RoundingBits", "one_cpu_thread", "philox_bits", "round_",
    "round_to_dtype", "rounded_write_", "rounding_seed", "stochastic_round",
]


def rounding_seed(run_seed: int, step: int, name: str, group: int = 0) -> int:
    """The 63-bit seed of the rounding of parameter ``name`` after step ``step``'s update.

    Derived like :func:`zoft.zo.perturb.derive_seed` but from a distinct string, so the rounding bits
    never coincide with a direction's z. ``group`` numbers the roundings of one update that applies more
    than 4 directions in several fused-kernel calls (each call rounds; group 0 is the usual case).
    """
    suffix = f":{group}" if group else ""
    digest = hashlib.blake2b(f"{run_seed}:{step}:round:{name}{suffix}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RoundingBits:
    """The 16-bit uniform integers of one tensor's stochastic rounding, taken chunk by chunk in element order.

    Args:
        seed: e.g. :func:`rounding_seed`.
        device: where the bits are drawn (and returned).
        generator: ``"philox"`` (device-independent, addressable by offset) or ``"torch"``
            (``torch.Generator`` on ``device``; 64-bit words split into four 16-bit lanes).
    """

    def __init__(self, seed: int, device: torch.device | str, generator: str = "philox") -> None:
        if generator not in BITS_GENERATORS:
            raise ValueError(f"unknown bits generator {generator!r}; expected one of {BITS_GENERATORS}")
        self.seed, self.device, self.generator = int(seed), torch.device(device), generator
        self.offset = 0
        self._gen: torch.Generator | None = None
        if generator == "torch":
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(self.seed)

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` values, int32 in [0, 65536)."""
        if self.generator == "philox":
            r = philox_bits(self.seed, n, self.device, offset=self.offset)
        else:
            r = self._lanes(n).to(torch.int32).add_(32768)
        self.offset += n
        return r

    def add_to_(self, t: torch.Tensor) -> torch.Tensor:
        """Add the next ``t.numel()`` values to the int32 tensor ``t`` in place (what :meth:`take` would give)."""
        n = t.numel()
        if self.generator == "philox":
            t.add_(philox_bits(self.seed, n, self.device, offset=self.offset).view(t.shape))
        else:
            # int16 lane + 32768 = the lane's uint16 value (converted first: a mixed int16/int32 add is a slow loop)
            t.add_(self._lanes(n).view(t.shape).to(torch.int32)).add_(32768)
        self.offset += n
        return t

    def _lanes(self, n: int) -> torch.Tensor:
        # random_ over the full int64 range gives 64 random bits per word (0.8 ns per 4 values on this CPU,
        # a tenth of randn's cost per value); each int16 lane is uniform over [-32768, 32768).
        words = torch.empty(-(-n // 4), dtype=torch.int64, device=self.device)
        words.random_(-(2**63), None, generator=self._gen)
        return words.view(torch.int16)[:n]


def _check(x: torch.Tensor, dtype: torch.dtype, rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
    if dtype not in _HALF_DTYPES:
        raise ValueError(f"storage dtype must be bfloat16 or float16, got {dtype}")
    if x.dtype != torch.float32:
        raise ValueError(f"rounding to {dtype} starts from float32 values, got {x.dtype}")


def round_to_dtype(
    x: torch.Tensor,
    dtype: torch.dtype,
    rounding: str = "stochastic",
    seed: int | None = None,
    *,
    generator: str = "philox",
) -> torch.Tensor:
    """``x`` (fp32) rounded to the 16-bit ``dtype``; returns a tensor of ``dtype``.

    ``nearest`` is ``x.to(dtype)`` (round to nearest, ties to even). ``stochastic`` follows the module's
    rule with the bits of ``RoundingBits(seed, x.device, generator)`` in ``x``'s (contiguous) element order.

    Raises:
        ValueError: an unknown rounding or dtype, a non-fp32 ``x``, or no seed for stochastic rounding.
    """
    _check(x, dtype, rounding)
    if rounding == "nearest":
        return x.to(dtype)
    if seed is None:
        raise ValueError("stochastic rounding needs a seed")
    x = x.contiguous()
    bits = RoundingBits(seed, x.device, generator)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    flat_x, flat_out = x.view(-1), out.view(-1)
    for a in range(0, flat_x.numel(), CHUNK):
        b = min(flat_x.numel(), a + CHUNK)
        flat_out[a:b] = stochastic_round(flat_x[a:b], dtype, bits.take(b - a))
    return out


@torch.no_grad()
def round_(
    x: torch.Tensor, dtype: torch.dtype, rounding: str = "stochastic", seed: int | None = None, *, generator: str = "philox"
) -> torch.Tensor:
    """Round the fp32 tensor ``x`` in place to values representable in ``dtype`` (it stays fp32); returns ``x``."""
    return x.copy_(round_to_dtype(x, dtype, rounding, seed, generator=generator))


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops in one thread for the duration (no-op off CPU).

    The chunked loops below issue many small ops; splitting each over the intra-op threads only adds a
    barrier per op, which on a busy machine costs more than the op (measured on the 2-core CPU, 28M-weight
    bf16 update: 0.74 s with 2 threads vs 0.34 s with 1, under load). The other core stays free for the z
    prefetch thread (:class:`zoft.zo.perturb.ZOParameters`' update).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def rounded_write_(
    target: torch.Tensor,
    compute: Callable[[int, int, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    rounding: str,
    bits: RoundingBits | None,
) -> None:
    """Write ``compute``'s fp32 values into ``target``, rounded to ``dtype``, one chunk at a time.

    Args:
        target: a contiguous tensor of ``dtype`` (a half-precision weight) or fp32 (a resident copy of a
            block stored in ``dtype``, which then holds ``dtype``'s values exactly).
        compute: ``(start, stop, scratch) -> fp32 values of flat elements [start, stop)``; ``scratch`` is an
            fp32 buffer of that length it may fill and return. It reads ``target`` before the chunk is
            written, so an in-place update sees the old values.
        dtype: the dtype whose values are written.
        rounding: ``"stochastic"`` (needs ``bits``) or ``"nearest"``.
        bits: the chunk-by-chunk bits of this tensor's rounding.
    """
    with one_cpu_thread(target.device):
        _rounded_write(target, compute, dtype, rounding, bits)


def _rounded_write(target, compute, dtype, rounding, bits) -> None:
    flat = target.view(-1)
    n = flat.numel()
    scratch = torch.empty(min(n, CHUNK), dtype=torch.float32, device=target.device)
    bits16 = flat.view(torch.int16) if target.dtype == dtype == torch.bfloat16 else None
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        acc = compute(a, b, scratch[: b - a])
        if rounding == "nearest":
            flat[a:b] = acc.to(dtype)
            continue
        if dtype == torch.bfloat16:
            # The rule's bit trick in place on the scratch: add r to the fp32 bits, keep the high 16. The same
            # bits as stochastic_round (tested), without its temporaries.
            ib = bits.add_to_(acc.view(torch.int32))
            if bits16 is not None:
                torch.bitwise_right_shift(ib, 16, out=bits16[a:b])  # the bf16 bit patterns, written in place
            else:
                flat[a:b] = ib.bitwise_right_shift_(16).bitwise_left_shift_(16).view(torch.float32)
            continue
        flat[a:b] = stochastic_round(acc, dtype, bits.take(b - a))
