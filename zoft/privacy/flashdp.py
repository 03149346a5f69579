"""FlashDP: DP-SGD with per-layer per-sample clipping done inside the ordinary backward pass.

Paper: "FlashDP: Private Training Large Language Models with Efficient DP-SGD" (2025),
https://arxiv.org/abs/2507.01154. Each trainable parameter ("layer") l has a bound C_l. While autograd
computes a layer's weight gradient, each sample's gradient is formed (a block of samples at a time,
or only its norm via the ghost-norm identity), scaled by ``min(1, C_l / ||g_l,b||)`` and summed into
``.grad``: no per-sample gradients are kept (Opacus keeps B copies of every trainable tensor) and there
is no second backward (ghost clipping needs one). Noise ``N(0, sigma^2 sum_l C_l^2)`` is then added
once per optimizer step and the sum divided by the expected batch size (:func:`add_noise`).

How it is installed: :func:`attach_flashdp` sets an instance ``forward`` on each supported module
that owns a trainable parameter (``nn.Linear`` incl. LoRA A/B, GPT-2 ``Conv1D``, ``nn.Embedding``,
``nn.LayerNorm``, ``nn.RMSNorm`` and Llama-style ``*RMSNorm``). That forward calls a custom autograd
Function computing the same output; its backward returns the clipped sum as the parameter gradient.
Modules, parameters, buffers and ``state_dict`` are unchanged, so saved checkpoints are ordinary;
``handle.detach()`` deletes the instance forwards and the guard hooks.

Which rows are one example: the model's own call records the batch's example count B (and tokens T)
from its first input. A module input whose leading dimension is B has one example per row; one with
B*T rows holds the batch's tokens flattened example-major (OPT's MLP and final norm, MoE shared
experts reshape [B, T, d] to [B*T, d]) and is regrouped to [B, T, d]. Any other row count (e.g. a MoE
expert that receives a gathered subset of the tokens) is refused with one line: clipping its rows one
by one would clip tokens, not examples. Rows that pack several sequences (``position_ids`` that restart
at 0 inside a row, or ``cu_seq_lens_*``) are refused too.

Sampling (see :class:`PoissonBatchSampler`): the accountant's guarantee assumes Poisson sampling
(each example joins each logical batch independently with probability q) and add/remove-one
neighbours, sensitivity C. Fixed-size (shuffled) batches keep N fixed: neighbours replace one example,
the clipped sum moves by up to 2C, so :func:`add_noise` doubles the std with ``adjacency="replace_one"``.
Accounting shuffled batches with q = B/N is still not a proven bound (shuffling has been shown to give a
larger true epsilon, Chua et al. 2024, arXiv 2403.17673), so report it as such.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoft.errors import ZoftError
from zoft.kernels.flashdp_reference import bias_grad, clip_factors, linear_grad_explicit, linear_grad_ghost
from zoft.privacy.accounting import sensitivity_factor

__all__ = [
    "FlashDPHandle",
    "attach_flashdp",
    "split_total_bound",
    "add_noise",
    "DPOptimizer",
    "PoissonBatchSampler",
]

_PATHS = ("auto", "explicit", "ghost")


@dataclass
class _ParamInfo:
    name: str
    param: nn.Parameter
    bound: float
    pending: int = 0  # clipped contributions returned by our backward and not yet seen by the leaf hook


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # linear | conv1d | embedding | layernorm | rmsnorm
    handle: FlashDPHandle
    params: dict[str, _ParamInfo] = field(default_factory=dict)  # role ("weight"/"bias") -> info

    def scale(self, batch: int) -> float:
        per_sample = batch if self.handle.loss_reduction == "mean" else 1
        return float(self.handle.loss_scale) * per_sample

    def record(self, role: str, norms: torch.Tensor, path: str) -> None:
        info = self.params[role]
        info.pending += 1
        self.handle.norms[info.name] = norms.detach()
        self.handle.paths[f"{self.name}.{role}"] = path


class FlashDPHandle:
    """What :func:`attach_flashdp` returns: the bounds, what each layer did, and ``detach()``.

    Attributes:
        bounds: parameter name -> clipping bound C_l.
        paths: ``"<module>.<weight|bias>"`` -> the path its last backward took: ``explicit`` (per-sample
            gradients formed in blocks), ``ghost`` (norms from Gram matrices), ``triton`` (fused CUDA
            kernel), ``rows`` (embedding: per-sample rows summed by token id), ``elementwise`` (norm
            weights/biases, whose per-sample gradients are vectors).
        norms: parameter name -> per-sample gradient norms of the last backward, before clipping.
        rows: module name -> what a row of its last input was: ``example`` (leading dim B) or ``token``
            (B*T rows, regrouped into the B examples).
        loss_reduction: ``"mean"`` if the loss is the mean of per-sample losses over the micro-batch
            (per-sample gradients are then ``B *`` the batch gradient, as Opacus does), ``"sum"`` if summed.
        loss_scale: extra factor on every per-sample gradient; set it to the accumulation steps when the
            trainer divides the loss by them (HF Trainer does).
    """

    def __init__(self, loss_reduction: str, loss_scale: float, path: str):
        self.bounds: dict[str, float] = {}
        self.paths: dict[str, str] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.rows: dict[str, str] = {}
        self.loss_reduction = loss_reduction
        self.loss_scale = loss_scale
        self.path = path
        self._layers: list[_Layer] = []
        self._hooks: list = []
        self._attached = True
        self._batch: tuple[int, int | None] | None = None  # (examples, tokens) of the current forward

    def set_batch(self, examples: int, tokens: int | None = None) -> None:
        """Declare how many examples (and tokens per example) the next forward holds.

        The model's own call does this from its first input (``input_ids``, ``inputs_embeds`` or the first
        tensor argument); call it yourself only when the modules run outside a call of that model.
        """
        self._batch = (int(examples), None if tokens is None else int(tokens))

    @property
    def total_bound(self) -> float:
        """``sqrt(sum_l C_l^2)``: the L2 sensitivity of the summed clipped gradient."""
        return math.sqrt(sum(c * c for c in self.bounds.values()))

    def parameters(self) -> list[nn.Parameter]:
        """The clipped (trainable) parameters, in model order."""
        return [info.param for layer in self._layers for info in layer.params.values()]

    def detach(self) -> None:
        """Restore the modules' own forwards and remove the guard hooks (idempotent)."""
        if not self._attached:
            return
        for layer in self._layers:
            layer.module.__dict__.pop("forward", None)
            layer.module.__dict__.pop("_zoft_flashdp", None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._attached = False


# ---------------------------------------------------------------- autograd functions


def _linear_weight(layer: _Layer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x [B, n, d_in] and g [B, n, d_out], grouped by example."""
    info = layer.params["weight"]
    batch, tokens = x.shape[0], max(1, x.shape[1])
    d_in, d_out = x.shape[-1], g.shape[-1]
    path = layer.handle.path
    if path == "auto":
        # Ghost norm costs ~T^2 (d_in + d_out) per sample, the explicit one T d_in d_out.
        path = "ghost" if tokens * tokens < d_in * d_out else "explicit"
    scale = layer.scale(batch)
    if path == "ghost":
        grad, norms = linear_grad_ghost(x, g, info.bound, scale)
    elif x.is_cuda and _triton_available():
        from zoft.kernels.flashdp_triton import clipped_linear_weight_grad_triton

        grad, norms = clipped_linear_weight_grad_triton(x, g, info.bound, scale)
        path = "triton"
    else:
        grad, norms = linear_grad_explicit(x, g, info.bound, scale)
    layer.record("weight", norms, path)
    return grad


def _bias(layer: _Layer, g: torch.Tensor, batch: int) -> torch.Tensor:
    grad, norms = bias_grad(g.reshape(batch, -1, g.shape[-1]), layer.params["bias"].bound, layer.scale(batch))
    layer.record("bias", norms, "elementwise")
    return grad


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, transposed, examples):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.transposed, ctx.examples = layer, transposed, examples
        return F.linear(x, weight.t() if transposed else weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        layer, transposed, batch = ctx.layer, ctx.transposed, ctx.examples
        w = weight.t() if transposed else weight
        gx = gy @ w.to(gy.dtype) if ctx.needs_input_grad[0] else None
        gw = gb = None
        # Rows regrouped by example: [B, ...] as is, or [B*T, d] (example-major) as [B, T, d].
        g3 = gy.reshape(batch, -1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = _linear_weight(layer, x.reshape(batch, -1, x.shape[-1]), g3)
            gw = (gw.t() if transposed else gw).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = _bias(layer, g3, batch).to(layer.params["bias"].param.dtype)
        return gx, gw, gb, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, layer, examples):
        ctx.save_for_backward(ids)
        ctx.layer, ctx.shape, ctx.examples = layer, weight.shape, examples
        return F.embedding(ids, weight, layer.module.padding_idx)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        layer = ctx.layer
        info = layer.params["weight"]
        batch, dim = ctx.examples, gy.shape[-1]
        ids2 = ids.reshape(batch, -1)
        g3 = gy.reshape(batch, -1, dim).float() * layer.scale(batch)
        if layer.module.padding_idx is not None:
            g3 = g3 * (ids2 != layer.module.padding_idx).unsqueeze(-1)
        # Rows of one sample that share a token id add up before the norm: key = sample * V + id.
        vocab = ctx.shape[0]
        keys = (torch.arange(batch, device=ids.device).unsqueeze(1) * vocab + ids2).reshape(-1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(uniq.numel(), dim, dtype=torch.float32, device=gy.device)
        rows.index_add_(0, inverse, g3.reshape(-1, dim))
        sq = torch.zeros(batch, dtype=torch.float32, device=gy.device)
        sq.index_add_(0, torch.div(uniq, vocab, rounding_mode="floor"), rows.pow(2).sum(1))
        norms = sq.sqrt()
        factors = clip_factors(norms, info.bound)
        grad = torch.zeros(ctx.shape, dtype=torch.float32, device=gy.device)
        grad.index_add_(0, ids2.reshape(-1), (g3 * factors[:, None, None]).reshape(-1, dim))
        layer.record("weight", norms, "rows")
        return None, grad.to(info.param.dtype), None, None


class _ScaleShiftFn(torch.autograd.Function):
    """``y = xhat * w (+ b)``: the affine part of a LayerNorm/RMSNorm, with per-sample clipped grads."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, layer, examples):
        ctx.save_for_backward(xhat, weight)
        ctx.layer, ctx.examples = layer, examples
        y = xhat * weight
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, gy):
        xhat, weight = ctx.saved_tensors
        layer = ctx.layer
        batch, width = ctx.examples, weight.numel()
        gx = (gy * weight).to(xhat.dtype) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.needs_input_grad[1]:
            info = layer.params["weight"]
            per_sample = (gy.float() * xhat.float()).reshape(batch, -1, width).sum(1) * layer.scale(batch)
            norms = per_sample.norm(dim=1)
            gw = (clip_factors(norms, info.bound) @ per_sample).reshape(weight.shape).to(weight.dtype)
            layer.record("weight", norms, "elementwise")
        if ctx.needs_input_grad[2]:
            gb = _bias(layer, gy.reshape(batch, -1, width), batch)
            gb = gb.reshape(layer.params["bias"].param.shape).to(layer.params["bias"].param.dtype)
        return gx, gw, gb, None, None


# ---------------------------------------------------------------- module patching


def _module_kind(module: nn.Module) -> str | None:
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and cls.forward is nn.Embedding.forward:
        return "embedding"
    if isinstance(module, nn.LayerNorm) and cls.forward is nn.LayerNorm.forward:
        return "layernorm"
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm) and cls.forward is nn.RMSNorm.forward:
        return "rmsnorm"
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf"):
        return "conv1d"
    if cls.__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
        return "hf_rmsnorm"  # checked numerically against its own forward in _check_norm
    return None


def _normalize(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "layernorm":
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if kind == "rmsnorm":
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    # Llama-style: normalize in fp32, cast back, then the weight multiplies.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return h.to(x.dtype)


def _examples(layer: _Layer, x: torch.Tensor) -> int:
    """The number of examples among ``x``'s rows, or a one-line refusal when rows are not examples or tokens."""
    handle = layer.handle
    lead = x.shape[0] if x.dim() else 1
    if handle._batch is None:
        raise ZoftError(
            f"FlashDP: module {layer.name} ran outside a call of the model FlashDP was attached to, so the "
            "batch's example count is unknown; call the model itself, or handle.set_batch(examples, tokens) first"
        )
    examples, tokens = handle._batch
    if lead == examples:
        handle.rows[layer.name] = "example"
        return examples
    if tokens is not None and lead == examples * tokens:
        # [B, T, d] reshaped to [B*T, d] is example-major: rows b*T .. b*T+T-1 are example b's tokens.
        handle.rows[layer.name] = "token"
        return examples
    shape = f"{examples} examples" + (f" of {tokens} tokens" if tokens is not None else "")
    raise ZoftError(
        f"FlashDP: module {layer.name} got an input with {lead} rows for a batch of {shape}, so its rows are "
        "neither the examples nor all their tokens (e.g. a MoE expert sees a subset of the tokens) and per-example "
        "clipping cannot group them; freeze its parameters (requires_grad_(False)) or leave it out of the adapters"
    )


def _patched_forward(self: nn.Module, *args, **kwargs):
    layer: _Layer = self._zoft_flashdp
    if not torch.is_grad_enabled():
        return type(self).forward(self, *args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()))
    m = self
    examples = _examples(layer, x)
    if layer.kind == "linear":
        return _LinearFn.apply(x, m.weight, m.bias, layer, False, examples)
    if layer.kind == "conv1d":
        return _LinearFn.apply(x, m.weight, m.bias, layer, True, examples)
    if layer.kind == "embedding":
        return _EmbeddingFn.apply(x, m.weight, layer, examples)
    bias = getattr(m, "bias", None)
    return _ScaleShiftFn.apply(_normalize(m, layer.kind, x), m.weight, bias, layer, examples)


def _batch_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds"):
        if torch.is_tensor(kwargs.get(key)):
            return kwargs[key]
    for value in list(args) + list(kwargs.values()):
        if torch.is_tensor(value):
            return value
    return None


def _refuse_packed_rows(kwargs: dict) -> None:
    """Refuse rows that hold several sequences: their examples would be clipped together as one."""
    packed = any(k.startswith("cu_seq_lens") and kwargs[k] is not None for k in kwargs)
    positions = kwargs.get("position_ids")
    if not packed and torch.is_tensor(positions) and positions.dim() == 2 and positions.shape[1] > 1:
        starts = positions == 0
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.shape == positions.shape:
            starts = starts & mask.bool()  # left padding may repeat position values before the text
        packed = bool((starts.sum(1) > 1).any())
    if packed:
        raise ZoftError(
            "FlashDP: the batch packs several sequences into one row (position_ids restart at 0, or cu_seq_lens_* "
            "are given), and per-example clipping would clip them as one example; turn packing / padding-free "
            "batching off (TRL: SFTConfig(packing=False, padding_free=False))"
        )


def _batch_hook(handle: FlashDPHandle):
    """Forward pre-hook of the model: record the batch's example count (and tokens) for the layers."""

    def hook(module, args, kwargs):
        t = _batch_tensor(args, kwargs)
        if t is not None and t.dim() > 0:
            # Tokens per example: dim 1 of token ids [B, T] or of any [B, T, ...] input; a float [B, d] has none.
            has_tokens = t.dim() >= 3 or (t.dim() == 2 and not t.is_floating_point())
            handle.set_batch(t.shape[0], t.shape[1] if has_tokens else None)
        if torch.is_grad_enabled():
            _refuse_packed_rows(kwargs)

    return hook


def _check_norm(name: str, module: nn.Module, kind: str) -> None:
    """Refuse a norm whose forward is not ``normalize(x) * weight (+ bias)`` (e.g. Gemma's ``1 + w``)."""
    width = module.weight.numel()
    shape = tuple(module.weight.shape)
    with torch.no_grad():
        x = torch.randn((2, 3) + shape, generator=torch.Generator().manual_seed(0)).to(module.weight)
        expected = module(x)
        got = _normalize(module, kind, x) * module.weight
        if getattr(module, "bias", None) is not None:
            got = got + module.bias
    if width and not torch.allclose(expected, got, rtol=1e-3, atol=1e-4):
        raise ZoftError(
            f"FlashDP: norm module {name} ({type(module).__name__}) does not compute normalize(x) * weight; "
            "freeze its parameters (requires_grad_(False)) or use a supported norm"
        )


def split_total_bound(names: Iterable[str], total_bound: float) -> dict[str, float]:
    """Split a total bound evenly over L parameters: ``C_l = total / sqrt(L)``, so ``sum C_l^2 = total^2``."""
    names = list(names)
    if not names:
        raise ZoftError("FlashDP: the model has no trainable parameters to clip; unfreeze some")
    return {n: total_bound / math.sqrt(len(names)) for n in names}


def attach_flashdp(
    model: nn.Module,
    clip_bounds: Mapping[str, float] | None = None,
    *,
    total_bound: float | None = None,
    loss_reduction: str = "mean",
    loss_scale: float = 1.0,
    path: str = "auto",
) -> FlashDPHandle:
    """Make ``loss.backward()`` leave per-layer clipped, summed per-sample gradients in ``.grad``.

    The examples of a batch are the rows of the model's first input (``input_ids``, ``inputs_embeds`` or
    the first tensor argument): a module input's rows are grouped into those examples, whether it keeps
    the batch dimension first or flattens the batch's tokens into ``[B*T, d]`` (see the module docstring).
    Each trainable parameter is one clipping group ("layer", as Opacus's ``clipping="per_layer"``). Call :func:`add_noise` (or step a
    :class:`DPOptimizer`) once per optimizer step afterwards.

    Args:
        model: the model; every trainable parameter must live in a supported module.
        clip_bounds: parameter name (as in ``model.named_parameters()``) -> bound, for every trainable one.
        total_bound: alternatively, a total split as ``total / sqrt(L)`` over the L trainable parameters.
        loss_reduction: ``"mean"`` (loss is the mean of per-sample losses; Opacus's default) or ``"sum"``.
        loss_scale: extra factor on per-sample gradients (e.g. gradient-accumulation steps when the
            trainer divides the loss by them).
        path: ``"auto"`` picks per layer and batch shape (ghost norm when ``T^2 < d_in d_out``),
            or force ``"explicit"`` / ``"ghost"`` for linear layers.

    Returns:
        A :class:`FlashDPHandle`; ``handle.detach()`` restores the model.

    Raises:
        ZoftError: a module mixes samples (batch norm), a trainable parameter is in an unsupported
            module or shared by two modules, the bounds are missing/unknown/not positive, or bad options.
            During training: a module's input rows are neither the examples nor all their tokens, or a
            batch packs several sequences into one row.
    """
    if (clip_bounds is None) == (total_bound is None):
        raise ZoftError("FlashDP: give exactly one of clip_bounds (per parameter) or total_bound")
    if loss_reduction not in ("mean", "sum"):
        raise ZoftError(f"FlashDP: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if path not in _PATHS:
        raise ZoftError(f"FlashDP: path must be one of {', '.join(_PATHS)}, got {path!r}")

    mixing = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if mixing:
        raise ZoftError(
            f"FlashDP: {', '.join(mixing)} mixes the samples of a batch, which breaks per-sample clipping; "
            "replace batch norm with GroupNorm or LayerNorm"
        )

    param_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if p.requires_grad and mod_name not in owners.get(id(p), []):
                owners.setdefault(id(p), []).append(mod_name or "<model>")
    shared = [f"{param_names[pid]} (in {' and '.join(mods)})" for pid, mods in owners.items() if len(mods) > 1]
    if shared:
        raise ZoftError(
            f"FlashDP: trainable parameter shared by several modules: {', '.join(shared)}; per-sample "
            "clipping needs one owner: untie it (e.g. tie_word_embeddings=False) or freeze it"
        )

    if total_bound is not None:
        if not total_bound > 0:
            raise ZoftError(f"FlashDP: total_bound must be > 0, got {total_bound}")
        bounds = split_total_bound(param_names.values(), float(total_bound))
    else:
        bounds = {k: float(v) for k, v in clip_bounds.items()}
        missing = sorted(set(param_names.values()) - set(bounds))
        unknown = sorted(set(bounds) - set(param_names.values()))
        if missing or unknown:
            raise ZoftError(
                "FlashDP: clip_bounds must name every trainable parameter"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; not trainable parameters: {', '.join(unknown)}" if unknown else "")
                + "; or pass total_bound instead"
            )
        bad = [k for k, v in bounds.items() if not v > 0]
        if bad:
            raise ZoftError(f"FlashDP: clip bounds must be > 0: {', '.join(bad)}")

    handle = FlashDPHandle(loss_reduction, loss_scale, path)
    unsupported = []
    planned: list[_Layer] = []
    for mod_name, module in model.named_modules():
        trainable = {r: p for r, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not trainable:
            continue
        kind = _module_kind(module)
        allowed = {"weight", "bias"} if kind not in ("embedding", "hf_rmsnorm", "rmsnorm") else {"weight"}
        if kind is None or not set(trainable) <= allowed:
            unsupported.append(f"{mod_name} ({type(module).__name__})")
            continue
        if "forward" in module.__dict__:
            raise ZoftError(
                f"FlashDP: module {mod_name} already has a replaced forward (another hook or method); "
                "attach FlashDP before other wrappers or freeze that module"
            )
        if kind == "embedding" and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
            raise ZoftError(
                f"FlashDP: embedding {mod_name} uses max_norm/scale_grad_by_freq/sparse, which per-sample "
                "clipping does not support; turn them off or freeze the embedding"
            )
        if kind in ("layernorm", "rmsnorm", "hf_rmsnorm"):
            _check_norm(mod_name, module, kind)
        layer = _Layer(mod_name, module, kind, handle)
        for role, p in trainable.items():
            layer.params[role] = _ParamInfo(param_names[id(p)], p, bounds[param_names[id(p)]])
        planned.append(layer)
    if unsupported:
        raise ZoftError(
            f"FlashDP: no per-sample clipping for trainable parameters of {', '.join(unsupported)}; "
            "freeze them (requires_grad_(False)) or train only Linear/Embedding/LayerNorm/RMSNorm/LoRA"
        )

    handle.bounds = {info.name: info.bound for layer in planned for info in layer.params.values()}
    for layer in planned:
        layer.module._zoft_flashdp = layer
        layer.module.forward = types.MethodType(_patched_forward, layer.module)
        for info in layer.params.values():
            handle._hooks.append(info.param.register_hook(_guard_hook(layer, info)))
        handle._layers.append(layer)
    handle._hooks.append(model.register_forward_pre_hook(_batch_hook(handle), with_kwargs=True))
    return handle


def _guard_hook(layer: _Layer, info: _ParamInfo):
    """Fail loudly when a gradient reaches a parameter other than through one clipped call."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        pending, info.pending = info.pending, 0
        if pending == 0:
            raise ZoftError(
                f"FlashDP: parameter {info.name} got a gradient outside its module {layer.name}'s forward "
                "(used directly elsewhere), which would skip clipping; freeze it or route it through the module"
            )
        if pending > 1:
            raise ZoftError(
                f"FlashDP: module {layer.name} ran {pending} times before one backward, so a sample's "
                "contributions would be clipped separately; call backward after each forward and do not "
                "reuse a layer within one forward"
            )
        return grad

    return hook


# ---------------------------------------------------------------- noise and optimizer


def _total(bounds: FlashDPHandle | Mapping[str, float] | float) -> float:
    if isinstance(bounds, FlashDPHandle):
        return bounds.total_bound
    if isinstance(bounds, Mapping):
        return math.sqrt(sum(float(c) ** 2 for c in bounds.values()))
    return float(bounds)


def add_noise(
    params: Iterable[torch.Tensor],
    sigma: float,
    bounds: FlashDPHandle | Mapping[str, float] | float,
    generator: torch.Generator | None = None,
    expected_batch_size: float | None = None,
    adjacency: str = "add_remove",
) -> float:
    """Add ``N(0, (k sigma sqrt(sum_l C_l^2))^2)`` to every ``.grad``, then divide by the batch size.

    Call once per optimizer step, after all micro-batches of the logical batch (gradient accumulation
    only sums clipped gradients). A parameter with no ``.grad`` (e.g. an empty Poisson batch) gets pure
    noise, as the accounting assumes.

    Args:
        params: the clipped parameters (``handle.parameters()``).
        sigma: the noise multiplier.
        bounds: the handle, a name -> bound dict, or the total bound ``sqrt(sum_l C_l^2)`` itself.
        generator: source of the noise (on the parameters' device); the global RNG if None.
        expected_batch_size: divide by this (``q * N`` under Poisson sampling, ``B`` for fixed batches);
            no division if None.
        adjacency: ``"add_remove"`` (Poisson sampling: one example moves the clipped sum by at most
            ``C``, k = 1) or ``"replace_one"`` (fixed-size batches: up to ``2C``, k = 2).

    Returns:
        The noise standard deviation used (before the division).
    """
    if sigma < 0:
        raise ZoftError(f"FlashDP: the noise multiplier must be >= 0, got {sigma}")
    if expected_batch_size is not None and not expected_batch_size > 0:
        raise ZoftError(f"FlashDP: expected_batch_size must be > 0, got {expected_batch_size}")
    std = float(sigma) * sensitivity_factor(adjacency) * _total(bounds)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if std > 0:
            p.grad.add_(torch.empty_like(p.grad).normal_(0.0, std, generator=generator))
        if expected_batch_size is not None:
            p.grad.div_(expected_batch_size)
    return std


class DPOptimizer:
    """Wrap an optimizer so that ``step()`` adds the DP noise once and divides by the batch size.

    Backward any number of micro-batches (their clipped sums accumulate in ``.grad``), then call
    ``step()`` once. ``steps`` counts noised steps for the accountant.

    Args:
        optimizer: the inner optimizer over (at least) the clipped parameters.
        handle: from :func:`attach_flashdp`.
        noise_multiplier: sigma.
        expected_batch_size: logical batch size the sum is divided by (``q * N`` with Poisson sampling).
        generator: noise RNG on the parameters' device.
        adjacency: ``"add_remove"`` with Poisson sampling (the default), ``"replace_one"`` with fixed-size
            batches (the noise std doubles, see :func:`add_noise`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        handle: FlashDPHandle,
        noise_multiplier: float,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
        adjacency: str = "add_remove",
    ):
        sensitivity_factor(adjacency)  # validate now, not at the first step
        self.adjacency = adjacency
        self.optimizer = optimizer
        self.handle = handle
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator
        self.steps = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def pre_step(self) -> None:
        """Noise and division only (what ``step`` does before the inner optimizer's step)."""
        add_noise(
            self.handle.parameters(), self.noise_multiplier, self.handle, self.generator, self.expected_batch_size,
            self.adjacency,
        )
        self.steps += 1

    def step(self, closure=None):
        self.pre_step()
        return self.optimizer.step(closure)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


class PoissonBatchSampler:
    """Batch sampler for ``DataLoader(batch_sampler=...)``: each index joins each batch with prob. q.

    This is the sampling the RDP/PRV accountants assume. Batch sizes vary (mean ``q * N``) and a batch
    may be empty: the training loop must still take the (pure-noise) step for it, and divide by
    ``expected_batch_size``, not by the actual size. Split a large batch into micro-batches yourself.

    Args:
        num_samples: N, the data set size.
        sample_rate: q in (0, 1].
        steps: batches per iteration over the sampler (default ``round(1 / q)``, one expected epoch).
        generator: CPU generator for reproducible batches.
    """

    def __init__(
        self, num_samples: int, sample_rate: float, steps: int | None = None, generator: torch.Generator | None = None
    ):
        if num_samples < 1:
            raise ZoftError(f"Poisson sampling needs a non-empty data set, got {num_samples} samples")
        if not 0 < sample_rate <= 1:
            raise ZoftError(f"Poisson sampling: sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
