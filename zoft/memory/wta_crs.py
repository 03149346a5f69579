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
* with ``apply_wta_crs(..., grad_norm_cache=cache)`` and ``cache.set_batch(example_ids)`` before each
  forward, the cached norms are used once an example comes back (multi-epoch fine-tuning).

Either way the estimator is unbiased (any fixed proposal with ``p_i > 0`` wherever ``x_i != 0`` is).
Unlike the reference code we also reweight the sampled rows when no gradient norm is known (it skips the
``1/(s p_i)`` factor there, which biases that estimate), and cached norms are floored so a token whose
gradient was zero last time can still be drawn.

The deterministic set size ``|C|`` minimises the paper's variance proxy ``(1 - sum_{c in C} p_c) / (k - |C|)``
over ``|C| in {0, ..., k-1}`` (``|C| = 0`` is plain column-row sampling, proxy ``1/k``); at least one row
is always sampled so the estimate never drops the tail.

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

import math
import re
import weakref
from collections.abc import Iterable, Sequence

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
    receives the per-token output-gradient norms in backward (see :class:`GradNormCache`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, idx, weights, recorder):
        out = F.linear(x, weight, bias)
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
        weight = ctx.saved_tensors[0]
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.exact:
                x = ctx.saved_tensors[1]
                grad_w = g2d.t().matmul(x.reshape(-1, x.shape[-1]).to(g2d.dtype))
            else:
                rows, idx, w = ctx.saved_tensors[1:]
                g_sel = g2d.index_select(0, idx) * w.to(g2d.dtype).unsqueeze(1)
                grad_w = g_sel.t().matmul(rows.to(g_sel.dtype))  # autocast: rows may be fp32
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)
        if ctx.recorder is not None:
            ctx.recorder(torch.linalg.vector_norm(g2d, dim=1, dtype=torch.float32))
        return grad_x, grad_w, grad_b, None, None, None, None


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


class _SampleMemo:
    """Reuses one row sample for consecutive layers that read the very same input tensor.

    q/k/v (and gate/up) all read one normalised hidden state; sampling it once means the kept rows are
    stored once for the group instead of once per layer. Only weak references are held: the sample lives
    as long as the autograd graph that saved it.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._refs: list[weakref.ref] = []

    def get(self, x: torch.Tensor, ratio: float):
        if self._key is None or self._key[0]() is not x or self._key[1:] != (x._version, ratio):
            return None
        tensors = [r() for r in self._refs]
        return None if any(t is None for t in tensors) else tuple(tensors)

    def put(self, x: torch.Tensor, ratio: float, sample) -> None:
        self._key = (weakref.ref(x), x._version, ratio)
        self._refs = [weakref.ref(t) for t in sample]


class GradNormCache:
    """Per-example, per-layer output-gradient norms from each example's previous backward pass.

    This is the forward-time estimate of ``||g_i||`` that the authors' code uses. Call
    :meth:`set_batch` with the dataset indices of the batch before each training forward; without it
    (or on an example's first visit) the layers fall back to ``p_i ∝ ||x_i||``.

    Memory: one bfloat16 scalar per token per replaced layer per example, on the CPU (e.g. 8,000 examples
    x 128 tokens x 210 layers ≈ 430 MB).
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_ids: list[int] | None = None
        self._store: dict[str, dict[int, torch.Tensor]] = {}

    def set_batch(self, example_ids: Sequence[int] | torch.Tensor | None) -> None:
        """Declare the dataset indices of the next batch (``None`` disables the cache for it)."""
        if example_ids is None:
            self.batch_ids = None
        elif isinstance(example_ids, torch.Tensor):
            self.batch_ids = [int(i) for i in example_ids.reshape(-1).tolist()]
        else:
            self.batch_ids = [int(i) for i in example_ids]

    def lookup(self, layer: str, x_shape: torch.Size) -> torch.Tensor | None:
        """The cached ``(batch * seq,)`` norms for this layer and batch, or ``None`` if any example misses."""
        ids = self.batch_ids
        if ids is None or len(x_shape) != 3 or x_shape[0] != len(ids):
            return None
        table = self._store.get(layer, {})
        rows = [table.get(i) for i in ids]
        if any(r is None or r.numel() != x_shape[1] for r in rows):
            return None
        return torch.cat(rows)

    def recorder(self, layer: str, x_shape: torch.Size):
        """A callback for the backward pass that stores this batch's gradient norms under its example ids."""
        ids = self.batch_ids
        if ids is None or len(x_shape) != 3 or x_shape[0] != len(ids):
            return None
        ids = list(ids)

        def record(norms: torch.Tensor) -> None:
            per_example = norms.detach().to(device=self.device, dtype=self.dtype).reshape(len(ids), -1)
            table = self._store.setdefault(layer, {})
            for i, row in zip(ids, per_example):
                table[i] = row.clone()

        return record

    def __len__(self) -> int:
        return sum(len(t) for t in self._store.values())


class WTACRSLinear(nn.Module):
    """A drop-in for ``nn.Linear`` whose backward uses a WTA-CRS weight-gradient estimate.

    The wrapped linear's ``weight`` and ``bias`` parameters are registered here as the same objects (no
    copy), so ``state_dict`` keys and optimizers are unchanged. In eval mode, under ``torch.no_grad()``,
    with ``ratio == 1`` or with a frozen weight it runs the plain ``F.linear``.

    Args:
        linear: the ``nn.Linear`` to wrap.
        ratio: fraction of tokens whose input rows are kept for the weight gradient, in (0, 1].
        grad_norm_cache: optional :class:`GradNormCache` (forward-time gradient-norm estimate).
        name: the module's name, the key under which ``grad_norm_cache`` stores its norms.
        generator: optional RNG for the sampling.
        sample_memo: shared by the layers of one :func:`apply_wta_crs` call, so layers reading the same
            input tensor (q/k/v) store one sample of it; ``None`` samples independently.

    Raises:
        ZoftError: if ``ratio`` is outside (0, 1].
    """

    def __init__(
        self,
        linear: nn.Linear,
        ratio: float,
        grad_norm_cache: GradNormCache | None = None,
        name: str = "",
        generator: torch.Generator | None = None,
        sample_memo: _SampleMemo | None = None,
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
        self.generator = generator
        self.sample_memo = sample_memo
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
        recorder = None
        if self.grad_norm_cache is not None:
            recorder = self.grad_norm_cache.recorder(self.name, x.shape)
        sample = self.sample_memo.get(x, self.ratio) if self.sample_memo is not None else None
        if sample is None:
            hint = (
                self.grad_norm_cache.lookup(self.name, x.shape) if self.grad_norm_cache is not None else None
            )
            sample = sample_rows(x, self.ratio, hint, self.generator)
            if sample is not None and self.sample_memo is not None:
                self.sample_memo.put(x, self.ratio, sample)
        rows, idx, w = sample if sample is not None else (None, None, None)
        return WTACRSLinearFunction.apply(x, self.weight, self.bias, rows, idx, w, recorder)

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
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replace matching linear layers by :class:`WTACRSLinear`, in place.

    Matching follows peft's ``target_modules``: a string is a regex that must match the full module name,
    a list matches names equal to or ending in ``"." + item``. For a matched plain ``nn.Linear`` with a
    trainable weight the layer itself is wrapped. For a matched peft LoRA layer each adapter's ``lora_A``
    is wrapped (the frozen base layer keeps no input; ``lora_A`` keeps the full one), plus the base layer
    if its weight is trainable. Apply it after ``peft.get_peft_model``.

    Args:
        model: a ``torch.nn.Module`` (an HF model or a ``PeftModel``).
        ratio: fraction of tokens kept for weight gradients, in (0, 1].
        target_modules: regex string or list of name suffixes, e.g. :data:`LLAMA_TARGET_MODULES`.
        grad_norm_cache: optional :class:`GradNormCache` shared by all replaced layers.
        generator: optional RNG for the sampling.

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
    memo = _SampleMemo()
    for name, linear in plan:
        wrapped = WTACRSLinear(
            linear, ratio, grad_norm_cache, name=name, generator=generator, sample_memo=memo
        )
        _set_submodule(model, name, wrapped)
    return [name for name, _ in plan]


def remove_wta_crs(model: nn.Module) -> list[str]:
    """Put the original ``nn.Linear`` modules back in place of every :class:`WTACRSLinear`.

    Returns:
        The names of the restored modules.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, WTACRSLinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).original)
    return names
