"""WTA-CRS: linear layers that keep only a sampled subset of their input rows for the backward pass.

The forward pass is exact. For the weight gradient ``grad_W = sum_i g_i x_i^T`` (one column-row pair per
token ``i``) only ``k = ceil(ratio * tokens)`` input rows are stored: the pairs with the highest sampling
probability are kept deterministically ("winner-take-all"), the rest are sampled with replacement and
reweighted so the estimate stays unbiased. The input gradient ``g W`` is exact. Paper: "Winner-Take-All
Column Row Sampling for Memory Efficient Adaptation of Language Model", Liu et al., NeurIPS 2023,
https://arxiv.org/abs/2305.15265. Saves activation memory: a replaced linear holds ``ratio`` of its input.

Sampling probability at forward time
------------------------------------
The variance-optimal probability is ``p_i ∝ ||x_i|| * ||g_i||`` but the output gradient ``g`` does not
exist yet during the forward pass. The authors' code (github.com/zirui-ray-liu/WTACRS,
``approxlinear/scheme.py`` and ``functional.py``) keeps, for every training example and every replaced
layer, the per-token output-gradient norms from the example's previous visit (previous epoch) and uses
``p_i ∝ ||x_i|| * ||g_i^prev||``; an example seen for the first time uses ``p_i ∝ ||x_i||``. We do the same:

* without a :class:`GradNormCache` (the default) ``p_i ∝ ||x_i||`` -- the paper's first-visit rule;
* with ``apply_wta_crs(..., grad_norm_cache=GradNormCache())`` the cached norms are used once an example
  comes back (multi-epoch fine-tuning). Examples are recognised by their tokens (a hash of each row's
  non-padding ``input_ids``), so any Trainer, collator or shuffling works; padding positions are not stored
  and get the floor below, so padding (zero gradient) stops taking the budget from the second visit on.

Either way the estimator is unbiased (any fixed proposal with ``p_i > 0`` wherever ``x_i != 0`` is).
Unlike the reference code we also reweight the sampled rows when no gradient norm is known (it skips the
``1/(s p_i)`` factor there, which biases that estimate), and cached norms are floored so a token whose
gradient was zero last time can still be drawn.

The deterministic set size ``|C|`` minimises the paper's variance proxy ``(1 - sum_{c in C} p_c) / (k - |C|)``
over ``|C| in {0, ..., k-1}`` (``|C| = 0`` is plain column-row sampling, proxy ``1/k``); at least one row
is always sampled so the estimate never drops the tail.

Seeds and gradient checkpointing
--------------------------------
A layer's sample is a pure function of its input and a seed: ``hash(forward seed, layer name)``. The forward
seed is drawn once per training forward of the model :func:`apply_wta_crs` was given (a forward pre-hook),
from torch's default generator, so ``set_seed`` reproduces it and HF's checkpoints (which save the RNG
state) resume it. Gradient checkpointing re-runs a segment's forward inside the backward without calling the
model again, so the recomputed layers see the same forward seed and draw the same rows: the gradient with
checkpointing (either ``use_reentrant``) equals the gradient without it.

Which modules are worth replacing
---------------------------------
Memory is freed only when *no other op* keeps the same input tensor (details and measurements in
``docs/wta_crs.md``). HF Llama: ``q_proj, k_proj, v_proj`` only together (they share the attention-norm
output; layers of one :func:`apply_wta_crs` call share one sample of a shared input), ``gate_proj,
up_proj`` only together, ``down_proj`` alone (its input ``act(gate) * up`` is a fresh FFN-width tensor).
``o_proj`` only with eager attention: SDPA keeps its own output, which is ``o_proj``'s input. With peft
LoRA the frozen base layer stores no input at all; the adapter's ``lora_A`` stores the full input, so
``lora_A`` is what gets wrapped (``lora_B``'s input has only ``r`` features and is left alone).
"""

from __future__ import annotations

import hashlib
import math
import re
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoft.errors import ZoftError

__all__ = [
    "GradNormCache",
    "WTACRSLinear",
    "WTACRSLinearFunction",
    "apply_wta_crs",
    "remove_wta_crs",
    "sample_rows",
    "sampling_probabilities",
    "wta_crs_linear",
    "wta_crs_sample",
    "LLAMA_TARGET_MODULES",
    "LLAMA_EAGER_TARGET_MODULES",
]

#: HF Llama projections worth replacing with SDPA attention (the default); the groups q/k/v and gate/up
#: must be replaced together.
LLAMA_TARGET_MODULES: list[str] = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
#: With ``attn_implementation="eager"`` o_proj's input is a fresh tensor, so o_proj is worth it too.
LLAMA_EAGER_TARGET_MODULES: list[str] = LLAMA_TARGET_MODULES + ["o_proj"]

# A cached gradient norm is floored at this fraction of the mean, so p_i > 0 wherever x_i != 0.
_GRAD_NORM_FLOOR = 1e-2


def _check_ratio(ratio: float) -> float:
    ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0.0 < float(ratio) <= 1.0
    if not ok:  # also rejects NaN: every comparison with NaN is False
        raise ZoftError(
            f"WTA-CRS ratio must be a number in (0, 1] (the fraction of tokens kept), got {ratio!r}; "
            "use e.g. 0.3, or 1.0 for exact gradients"
        )
    return float(ratio)


def sampling_probabilities(x2d: torch.Tensor, grad_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Column-row sampling probabilities for the rows of ``x2d``.

    Args:
        x2d: ``(n, d_in)`` layer input, one row per token.
        grad_norm: optional ``(n,)`` estimate of the output-gradient norm per token (from a previous visit).

    Returns:
        ``(n,)`` float32 probabilities summing to 1: ``∝ ||x_i||`` or ``∝ ||x_i|| * grad_norm_i``.
    """
    w = torch.linalg.vector_norm(x2d, dim=1, dtype=torch.float32)
    if grad_norm is not None:
        g = grad_norm.to(device=w.device, dtype=torch.float32)
        mean = g.mean()
        if mean > 0:
            w = w * g.clamp_min(_GRAD_NORM_FLOOR * mean)
    total = w.sum()
    if not torch.isfinite(total) or total <= 0:
        # All-zero (or non-finite) input: every row is as good as any other.
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


@torch.no_grad()
def wta_crs_sample(
    probs: torch.Tensor,
    k: int,
    *,
    winner_take_all: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose which rows to keep and how to weight them so that ``sum_j w_j f_{idx_j}`` is unbiased for ``sum_i f_i``.

    WTA-CRS: the ``c`` most probable rows are kept with weight 1, then ``s = k - c`` draws with replacement
    from the remaining rows (probability ``p_i / (1 - P_C)``) each get weight ``(1 - P_C) / (s p_i)``.
    Repeated draws are merged into one row with the summed weight, so at most ``k`` rows are stored.

    Args:
        probs: ``(n,)`` nonnegative sampling probabilities (normalised here).
        k: row budget, ``1 <= k``; ``k >= n`` keeps every row exactly.
        winner_take_all: ``False`` gives plain column-row sampling (``c = 0``), the paper's baseline.
        generator: optional RNG for the draws.

    Returns:
        ``(indices, weights)``: int64 row indices (unique) and float32 weights of the same length.
    """
    n = probs.numel()
    if k >= n:
        return torch.arange(n, device=probs.device), torch.ones(n, device=probs.device)
    p = probs.to(torch.float32)
    p = p / p.sum()
    det = torch.zeros(0, dtype=torch.long, device=p.device)
    if winner_take_all:
        top_p, top_idx = torch.topk(p, k)
        mass_before = torch.cat([top_p.new_zeros(1), torch.cumsum(top_p[:-1], 0)])  # P_C for |C| = 0..k-1
        proxy = (1.0 - mass_before) / (k - torch.arange(k, device=p.device, dtype=torch.float32))
        det = top_idx[: int(torch.argmin(proxy))]
    c = det.numel()
    residual = p.clone()
    residual[det] = 0.0
    mass = residual.sum()  # 1 - P_C, summed directly for precision
    det_w = torch.ones(c, device=p.device)
    if mass <= 0:
        # The remaining rows have zero probability, hence zero contribution: nothing to sample.
        return det, det_w
    s = k - c
    draws = torch.multinomial(residual, s, replacement=True, generator=generator)
    uniq, counts = torch.unique(draws, return_counts=True)
    stoc_w = counts.to(torch.float32) * mass / (s * residual[uniq])
    return torch.cat([det, uniq]), torch.cat([det_w, stoc_w])


def _rows_kept(ratio: float, n: int) -> int:
    return min(n, max(1, math.ceil(ratio * n)))


class WTACRSLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` exactly; backward gives the exact input gradient and the sampled weight gradient.

    ``rows, idx, weights`` come from :func:`sample_rows` (``None`` for an exact weight gradient, which
    keeps the whole input like ``F.linear``). Saved for backward: ``W`` (a parameter, no copy) and, when
    ``W`` needs a gradient, the kept rows, their int64 indices and float32 weights. ``recorder``, if given,
    receives the per-token output-gradient norms in backward (see :class:`GradNormCache`). ``seed``, the
    seed the sample was drawn with, is kept on the context (``ctx.seed``) for inspection.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, idx, weights, recorder, seed=None):
        out = F.linear(x, weight, bias)
        ctx.seed = seed
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.recorder = recorder
        ctx.exact = rows is None
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(weight)
        elif ctx.exact:
            ctx.save_for_backward(weight, x)
        else:
            ctx.save_for_backward(weight, rows, idx, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Unpack once: a non-reentrant gradient checkpoint allows each saved tensor to be unpacked only once.
        saved = ctx.saved_tensors
        weight = saved[0]
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.exact:
                x = saved[1]
                grad_w = g2d.t().matmul(x.reshape(-1, x.shape[-1]).to(g2d.dtype))
            else:
                rows, idx, w = saved[1:]
                g_sel = g2d.index_select(0, idx) * w.to(g2d.dtype).unsqueeze(1)
                grad_w = g_sel.t().matmul(rows.to(g_sel.dtype))  # autocast: rows may be fp32
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)
        if ctx.recorder is not None:
            ctx.recorder(torch.linalg.vector_norm(g2d, dim=1, dtype=torch.float32))
        return grad_x, grad_w, grad_b, None, None, None, None, None


@torch.no_grad()
def sample_rows(
    x: torch.Tensor,
    ratio: float,
    grad_norm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The WTA-CRS sample of the rows (tokens) of ``x`` kept for the weight gradient.

    Args:
        x: layer input ``(..., d_in)``; all leading dimensions are flattened into tokens.
        ratio: fraction of tokens kept, in (0, 1].
        grad_norm: optional ``(tokens,)`` forward-time estimate of the output-gradient norms.
        generator: optional RNG.

    Returns:
        ``(rows, idx, weights)`` with ``rows = x2d[idx]``, or ``None`` when every row is kept (exact).
    """
    x2d = x.reshape(-1, x.shape[-1])
    k = _rows_kept(ratio, x2d.shape[0])
    if k >= x2d.shape[0]:
        return None
    idx, w = wta_crs_sample(sampling_probabilities(x2d, grad_norm), k, generator=generator)
    return x2d.index_select(0, idx), idx, w


def wta_crs_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ratio: float,
    *,
    grad_norm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Functional form: ``F.linear`` whose weight gradient is the WTA-CRS estimate at ``ratio``.

    Raises:
        ZoftError: if ``ratio`` is outside (0, 1].
    """
    ratio = _check_ratio(ratio)
    sample = sample_rows(x, ratio, grad_norm, generator) if weight.requires_grad else None
    rows, idx, w = sample if sample is not None else (None, None, None)
    return WTACRSLinearFunction.apply(x, weight, bias, rows, idx, w, None)


def _mix(*parts) -> int:
    """A 63-bit seed from its parts, stable across processes and platforms."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _SeedClock:
    """The forward seed every layer of one :func:`apply_wta_crs` call derives its sample from.

    :meth:`tick` runs once per training forward of the model (a forward pre-hook on it); a gradient
    checkpoint's recomputation re-runs only a segment, never the model's own forward, so it sees the same
    forward seed. ``seed=None`` draws each forward seed from torch's default CPU generator (reproduced by
    ``set_seed``, saved and restored by HF's checkpoints); an int makes it ``hash(seed, forward count)``.
    """

    def __init__(self, seed: int | None = None, cache: GradNormCache | None = None):
        self.seed = seed
        self.cache = cache
        self.forwards = 0
        self.current: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._hook = None

    def tick(self) -> None:
        self.forwards += 1
        if self.seed is None:
            self.current = int(torch.randint(0, 2**62, (1,)).item())
        else:
            self.current = _mix("wta-crs", self.seed, self.forwards)

    def generator(self, layer: str, device: torch.device) -> tuple[int, torch.Generator]:
        """The seed of ``layer``'s sample in this forward and a generator on ``device`` seeded with it."""
        if self.current is None:  # a layer called before its model ever was (e.g. a module used alone)
            self.tick()
        seed = _mix(self.current, layer)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        return seed, gen

    def attach(self, model: nn.Module) -> None:
        """Tick (and give the cache the batch's token keys) before every training-mode forward of ``model``.

        Grad mode is not looked at, like dropout: a reentrant checkpoint's first pass runs under
        ``no_grad`` and must still advance the clock exactly as a forward without checkpointing does.
        """
        # A bound method, not a closure: copy.deepcopy(model) then gives the copy's hook the copy's clock.
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module, args, kwargs):
        if not module.training:
            return
        self.tick()
        if self.cache is not None and self.cache.key_by == "tokens":
            ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
            self.cache.set_batch_from_tokens(ids, kwargs.get("attention_mask"))

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __getstate__(self):  # torch.Generator objects are per-process scratch: not copied or pickled
        return {**self.__dict__, "_generators": {}}


class _SharedNorms:
    """Collects the output-gradient norms of the layers that share one sample, then stores them once.

    Layers reading one input (q/k/v) share one sample; the variance of their summed estimates is smallest
    with ``p_i ∝ ||x_i|| sqrt(sum_l ||g_il||^2)``, so the cache keeps that combined norm per token.
    """

    def __init__(self, store: Callable[[torch.Tensor], None]):
        self.store = store
        self.members = 1
        self._done = 0
        self._squares: torch.Tensor | None = None

    def join(self) -> None:
        self.members += 1

    def add(self, norms: torch.Tensor) -> None:
        sq = norms.float() ** 2
        self._squares = sq if self._squares is None else self._squares + sq
        self._done += 1
        if self._done == self.members:
            self.store(self._squares.sqrt())


class _SampleMemo:
    """Reuses one row sample for consecutive layers that read the very same input tensor.

    q/k/v (and gate/up) all read one normalised hidden state; sampling it once means the kept rows are
    stored once for the group instead of once per layer. The last sample is held (strongly) until the next
    one replaces it: under gradient checkpointing the forward's saved tensors are dropped at once, and the
    next layer of the group must still find the sample, exactly as it will in the recomputation.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._value = None

    def get(self, x: torch.Tensor, ratio: float, forward: int | None):
        """The sample stored for this very tensor (unchanged) in this very forward (``forward``: the seed)."""
        if self._key is None or self._key[0]() is not x or self._key[1:] != (x._version, ratio, forward):
            return None
        return self._value

    def put(self, x: torch.Tensor, ratio: float, forward: int | None, value) -> None:
        self._key = (weakref.ref(x), x._version, ratio, forward)
        self._value = value


class GradNormCache:
    """Per-example output-gradient norms from each example's previous backward pass (gradient-aware sampling).

    This is the forward-time estimate of ``||g_i||`` that the authors' code uses: an example's norms are
    recorded in every backward pass it takes part in (refreshed at each visit) and used at its next visit.
    Examples are identified by ``key_by``:

    - ``"tokens"`` (default): a hash of each row's non-padding ``input_ids``, set by the model's forward
      pre-hook that :func:`apply_wta_crs` installs. Only non-padding positions are stored, so a row padded
      to another length in a later batch still finds its norms; padding positions get the floor.
    - ``"explicit"``: call :meth:`set_batch` with the batch's dataset indices before each forward.

    Memory (CPU by default): one ``dtype`` scalar (2 bytes in bf16) per stored token per sample group per
    distinct example; a sample group is the layers of one input (q/k/v are one group, gate/up one,
    down_proj one; :func:`apply_wta_crs` on LoRA lora_A layers with dropout 0: q/k/v one). E.g. SmolLM2
    with the default Llama targets (3 groups x 30 layers), 8,000 examples of 128 tokens: 184 MB.
    :meth:`nbytes` gives the current size. ``hits`` / ``misses`` count the lookups of sampling layers.
    Setting ``refresh = False`` stops recording (the stored norms stay as they are; for measurements).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        key_by: str = "tokens",
    ):
        if key_by not in ("tokens", "explicit"):
            raise ZoftError(f"GradNormCache(key_by=...): expected 'tokens' or 'explicit', got {key_by!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.key_by = key_by
        self.batch_ids: list[int] | None = None
        self.batch_mask: torch.Tensor | None = None  # (batch, seq) bool: the stored positions
        self.hits = 0
        self.misses = 0
        self.refresh = True
        self._store: dict[str, dict[int, torch.Tensor]] = {}

    def set_batch(
        self, example_ids: Sequence[int] | torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> None:
        """Declare the example ids of the next batch (``None`` disables the cache for it).

        ``attention_mask`` ``(batch, seq)``: only its nonzero positions are stored and looked up.
        """
        if example_ids is None:
            self.batch_ids, self.batch_mask = None, None
            return
        if isinstance(example_ids, torch.Tensor):
            example_ids = example_ids.reshape(-1).tolist()
        self.batch_ids = [int(i) for i in example_ids]
        self.batch_mask = None if attention_mask is None else attention_mask.detach().to("cpu").bool()

    def set_batch_from_tokens(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None):
        """Key each row of a ``(batch, seq)`` token batch by a hash of its non-padding tokens."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            self.set_batch(None)  # e.g. inputs_embeds: nothing to recognise an example by
            return
        ids = input_ids.detach().to("cpu")
        mask = None
        if torch.is_tensor(attention_mask) and attention_mask.shape == ids.shape:
            mask = attention_mask.detach().to("cpu").bool()
        rows = [ids[r][mask[r]] if mask is not None else ids[r] for r in range(ids.shape[0])]
        keys = [_mix("tokens", hashlib.blake2b(row.numpy().tobytes(), digest_size=16).hexdigest()) for row in rows]
        self.set_batch(keys, mask)

    def _positions(self, x_shape: torch.Size) -> torch.Tensor | None:
        """The ``(batch, seq)`` mask of stored positions for an input of this shape, or None if it does not fit."""
        ids = self.batch_ids
        if ids is None or len(x_shape) != 3 or x_shape[0] != len(ids):
            return None
        if self.batch_mask is None:
            return torch.ones(x_shape[0], x_shape[1], dtype=torch.bool)
        return self.batch_mask if tuple(self.batch_mask.shape) == tuple(x_shape[:2]) else None

    def lookup(self, layer: str, x_shape: torch.Size) -> torch.Tensor | None:
        """The cached ``(batch * seq,)`` norms (0 at unstored positions), or ``None`` if any example misses."""
        mask = self._positions(x_shape)
        if mask is None:
            return None
        table = self._store.get(layer, {})
        rows = [table.get(i) for i in self.batch_ids]
        if any(r is None or r.numel() != int(m.sum()) for r, m in zip(rows, mask)):
            self.misses += 1
            return None
        self.hits += 1
        out = torch.zeros(mask.shape, dtype=torch.float32)
        out[mask] = torch.cat(rows).float()
        return out.reshape(-1)

    def recorder(self, layer: str, x_shape: torch.Size) -> Callable[[torch.Tensor], None] | None:
        """A callback for the backward pass that stores this batch's norms under its example ids."""
        mask = self._positions(x_shape)
        if mask is None or not self.refresh:
            return None
        ids = list(self.batch_ids)

        def record(norms: torch.Tensor) -> None:
            per_row = norms.detach().to(device="cpu", dtype=torch.float32).reshape(mask.shape)
            table = self._store.setdefault(layer, {})
            for i, row, m in zip(ids, per_row, mask):
                table[i] = row[m].to(device=self.device, dtype=self.dtype)

        return record

    def nbytes(self) -> int:
        """Bytes the cached norms take."""
        return sum(t.numel() * t.element_size() for table in self._store.values() for t in table.values())

    def __len__(self) -> int:
        return sum(len(t) for t in self._store.values())


class WTACRSLinear(nn.Module):
    """A drop-in for ``nn.Linear`` whose backward uses a WTA-CRS weight-gradient estimate.

    The wrapped linear's ``weight`` and ``bias`` parameters are registered here as the same objects (no
    copy), so ``state_dict`` keys and optimizers are unchanged. In eval mode, under ``torch.no_grad()``,
    with ``ratio == 1`` or with a frozen weight it runs the plain ``F.linear``.

    The sample is a pure function of the input and ``hash(forward seed, name)`` (see the module docstring),
    so a gradient checkpoint's recomputation draws the same rows. Used alone (not through
    :func:`apply_wta_crs`) the layer keeps its own clock, ticked by its own forward.

    Counters (for measuring, updated on every forward that samples): ``bytes_in``, the bytes of the inputs
    it sampled (what a plain ``nn.Linear`` would keep), and ``bytes_kept``, the bytes of the rows, indices
    and weights it keeps instead. A layer reusing another layer's sample of the same input counts neither.

    Args:
        linear: the ``nn.Linear`` to wrap.
        ratio: fraction of tokens whose input rows are kept for the weight gradient, in (0, 1].
        grad_norm_cache: optional :class:`GradNormCache` (forward-time gradient-norm estimate).
        name: the module's name: the key of its seed and of its norms in ``grad_norm_cache``.
        seed: for a layer used alone: an int fixes its samples (``hash(seed, forward count)``); ``None``
            draws a seed from torch's default generator at each training forward.
        sample_memo: shared by the layers of one :func:`apply_wta_crs` call, so layers reading the same
            input tensor (q/k/v) store one sample of it; ``None`` samples independently.
        clock: the shared forward-seed clock of an :func:`apply_wta_crs` call (``seed`` is then unused).

    Raises:
        ZoftError: if ``ratio`` is outside (0, 1].
    """

    def __init__(
        self,
        linear: nn.Linear,
        ratio: float,
        grad_norm_cache: GradNormCache | None = None,
        name: str = "",
        seed: int | None = None,
        sample_memo: _SampleMemo | None = None,
        clock: _SeedClock | None = None,
    ):
        super().__init__()
        self.ratio = _check_ratio(ratio)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        if linear.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = linear.bias
        self.grad_norm_cache = grad_norm_cache
        self.name = name
        self.sample_memo = sample_memo
        if clock is None:  # used alone: its own forward is the model's
            clock = _SeedClock(seed)
            clock.attach(self)
        self.clock = clock
        self.bytes_in = 0
        self.bytes_kept = 0
        # A tuple keeps the original module out of the module tree (no duplicate state_dict keys).
        self._original = (linear,)

    @property
    def original(self) -> nn.Linear:
        """The wrapped ``nn.Linear`` (sharing these parameters)."""
        return self._original[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.ratio >= 1.0
            or not self.training
            or not torch.is_grad_enabled()
            or not self.weight.requires_grad
        ):
            return F.linear(x, self.weight, self.bias)
        cache = self.grad_norm_cache
        if self.clock.current is None:
            self.clock.tick()
        # Keyed by the forward seed too: a model called twice with one input tensor samples it twice.
        forward = self.clock.current
        memo = self.sample_memo.get(x, self.ratio, forward) if self.sample_memo is not None else None
        if memo is not None:
            sample, shared, seed = memo
            if shared is not None:
                shared.join()
        else:
            seed, gen = self.clock.generator(self.name, x.device)
            hint = cache.lookup(self.name, x.shape) if cache is not None else None
            sample = sample_rows(x, self.ratio, hint, gen)
            store = cache.recorder(self.name, x.shape) if cache is not None else None
            shared = _SharedNorms(store) if store is not None else None
            if self.sample_memo is not None:
                self.sample_memo.put(x, self.ratio, forward, (sample, shared, seed))
            self.bytes_in += x.numel() * x.element_size()
            self.bytes_kept += (
                sum(t.numel() * t.element_size() for t in sample) if sample is not None else x.numel() * x.element_size()
            )
        rows, idx, w = sample if sample is not None else (None, None, None)
        recorder = shared.add if shared is not None else None
        return WTACRSLinearFunction.apply(x, self.weight, self.bias, rows, idx, w, recorder, seed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, ratio={self.ratio}"


def _is_lora_layer(module: nn.Module) -> bool:
    # peft's LoraLayer: a frozen `base_layer` plus ModuleDicts of adapters.
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _matcher(target_modules: str | Iterable[str]):
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ZoftError(
                f"WTA-CRS target_modules {target_modules!r} is not a valid regex ({e}); fix the pattern"
            ) from e
        return lambda name: pattern.fullmatch(name) is not None
    targets = [t for t in target_modules]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ZoftError(
            f"WTA-CRS target_modules must be a regex string or a non-empty list of module-name suffixes, "
            f"got {target_modules!r}; e.g. ['q_proj', 'k_proj', 'v_proj']"
        )
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _trainable_linear(m: nn.Module) -> bool:
    # Exact type: bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear but hold quantized weights.
    return type(m) is nn.Linear and m.weight.requires_grad


def apply_wta_crs(
    model: nn.Module,
    ratio: float,
    target_modules: str | Sequence[str],
    *,
    grad_norm_cache: GradNormCache | None = None,
    seed: int | None = None,
) -> list[str]:
    """Replace matching linear layers by :class:`WTACRSLinear`, in place.

    Matching follows peft's ``target_modules``: a string is a regex that must match the full module name,
    a list matches names equal to or ending in ``"." + item``. For a matched plain ``nn.Linear`` with a
    trainable weight the layer itself is wrapped. For a matched peft LoRA layer each adapter's ``lora_A``
    is wrapped (the frozen base layer keeps no input; ``lora_A`` keeps the full one), plus the base layer
    if its weight is trainable. Apply it after ``peft.get_peft_model``.

    A forward pre-hook on ``model`` draws the forward seed of each training forward (and, with a
    ``grad_norm_cache`` keyed by tokens, recognises the batch's examples): call ``model`` itself, not one of
    its submodules. Gradient checkpointing then draws the same samples as a run without it.

    Args:
        model: a ``torch.nn.Module`` (an HF model or a ``PeftModel``).
        ratio: fraction of tokens kept for weight gradients, in (0, 1].
        target_modules: regex string or list of name suffixes, e.g. :data:`LLAMA_TARGET_MODULES`.
        grad_norm_cache: optional :class:`GradNormCache` shared by all replaced layers: gradient-aware
            sampling from each example's second visit on (costs CPU memory, see the class).
        seed: ``None`` (default) draws each forward's seed from torch's default generator (``set_seed``
            reproduces it); an int makes the samples a function of (seed, forward count) alone.

    Returns:
        The names of the replaced modules (e.g. ``model.layers.0.self_attn.q_proj`` or
        ``...q_proj.lora_A.default``).

    Raises:
        ZoftError: ``ratio`` outside (0, 1]; ``target_modules`` matching no module, matching only modules
            without a trainable linear weight, or matching a layer that is already replaced.
    """
    ratio = _check_ratio(ratio)
    matches = _matcher(target_modules)
    modules = list(model.named_modules())
    lora_prefixes = tuple(name + "." for name, m in modules if _is_lora_layer(m))

    plan: list[tuple[str, nn.Linear]] = []
    matched: list[str] = []
    for name, m in modules:
        if not name or not matches(name):
            continue
        if lora_prefixes and name.startswith(lora_prefixes):
            continue  # parts of a LoRA layer are handled through the layer itself
        if isinstance(m, WTACRSLinear):
            raise ZoftError(
                f"module {name!r} already uses WTA-CRS; call remove_wta_crs(model) before applying it again"
            )
        if _is_lora_layer(m):
            matched.append(name)
            for adapter, lora_a in m.lora_A.items():
                if _trainable_linear(lora_a):
                    plan.append((f"{name}.lora_A.{adapter}", lora_a))
            if _trainable_linear(m.base_layer):
                plan.append((f"{name}.base_layer", m.base_layer))
        elif isinstance(m, nn.Linear):
            matched.append(name)
            if _trainable_linear(m):
                plan.append((name, m))

    if not matched:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in modules if n and (type(m) is nn.Linear or _is_lora_layer(m))}
        )
        leaves = [x for x in leaves if x not in ("default",)]
        raise ZoftError(
            f"WTA-CRS target_modules {target_modules!r} match no linear layer; "
            f"linear layers in this model are named: {', '.join(leaves[:20]) or '(none)'}"
        )
    if not plan:
        raise ZoftError(
            f"WTA-CRS target_modules {target_modules!r} match {len(matched)} layers (e.g. {matched[0]!r}) but none has a "
            "trainable weight, so there is no activation to save; unfreeze them or apply after get_peft_model"
        )
    memo, clock = _SampleMemo(), _SeedClock(seed, grad_norm_cache)
    clock.attach(model)
    for name, linear in plan:
        wrapped = WTACRSLinear(linear, ratio, grad_norm_cache, name=name, sample_memo=memo, clock=clock)
        _set_submodule(model, name, wrapped)
    return [name for name, _ in plan]


def remove_wta_crs(model: nn.Module) -> list[str]:
    """Put the original ``nn.Linear`` modules back in place of every :class:`WTACRSLinear`.

    Returns:
        The names of the restored modules.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, WTACRSLinear)]
    for name in names:
        layer = model.get_submodule(name)
        layer.clock.detach()  # the model's forward pre-hook
        _set_submodule(model, name, layer.original)
    return names
