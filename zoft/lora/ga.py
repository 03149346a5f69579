"""LoRA-GA: initialize LoRA adapters from the SVD of the full gradient so that LoRA's first step
follows full fine-tuning's.

Paper: "LoRA-GA: Low-Rank Adaptation with Gradient Approximation" (Wang, Yu, Li, 2024),
https://arxiv.org/abs/2407.05000. The gradient of every target weight is averaged over a few batches
(each gradient is folded into one fp32 buffer per weight as soon as autograd produces it, then freed),
A and B are set from its singular vectors, and the base weights are offset by ``-scaling * B @ A`` so
the model's output at step 0 is unchanged. What it saves: LoRA's slow start (the paper reports 2-4x
faster convergence) at LoRA's memory; the one-off estimation costs ``num_batches`` forward/backward
passes and one fp32 buffer per target weight.

Because the base weights are offset, a trained LoRA-GA adapter only fits the offset base.
:func:`save_lora_ga_adapter` writes, through peft's PiSSA/OLoRA/LoRA-GA conversion, an ordinary
rank-2r LoRA adapter for the *original* base model that plain ``PeftModel.from_pretrained`` loads.

Two scalings (``scale=``):

- ``"paper"`` (default), the paper's Algorithm 1 and its authors' code: ``A = c * V[:, :r]^T``,
  ``B = c * U[:, r:2r]`` with ``c = out_features**0.25 / sqrt(stable_gamma)``. Both factors are
  orthonormal up to ``c``, so LoRA's first step, ``-lr * s^2 * (B B^T G + G A^T A)``, equals
  ``-lr * s^2 * c^2`` times the best rank-2r approximation of the gradient ``G``.
- ``"stable"``, ``"unit"``, ``"weight_svd"``, ``"gd_scale"``: peft's ``lora_ga`` initialization
  (peft >= 0.19), used as is. It differs from the paper: peft multiplies B by the singular values
  ``S[r:2r]`` and applies ``c`` to B only, so the first step follows ``U S^3 V^T`` on B's half rather
  than the rank-2r approximation, and B shrinks with the gradient's scale.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from zoft.errors import ZoftError

PEFT_SCALES = ("stable", "unit", "weight_svd", "gd_scale")
Scale = Literal["paper", "stable", "unit", "weight_svd", "gd_scale"]

# Attribute that carries a target weight's averaged gradient from the estimation to the paper-variant
# initialization (peft's own variant reads ``_peft_loraga_grad``, the field ``preprocess_loraga`` sets).
_ZOFT_GRAD_ATTR = "_zoft_lora_ga_grad"
_PEFT_GRAD_ATTR = "_peft_loraga_grad"
# Where init_lora_ga records the initial adapter folder on the returned PeftModel.
_INITIAL_DIR_ATTR = "zoft_lora_ga_initial_adapter_dir"


def _as_lora_config(lora_config: Any):
    from peft import LoraConfig, PeftConfig

    if lora_config is None:
        raise ZoftError(
            "LoRA-GA needs a LoRA configuration; pass a peft LoraConfig or a dict of its arguments"
        )
    if isinstance(lora_config, LoraConfig):
        return copy.deepcopy(lora_config)
    if isinstance(lora_config, PeftConfig):
        raise ZoftError(
            f"LoRA-GA initializes LoRA adapters, got a {type(lora_config).__name__}; pass a LoraConfig instead"
        )
    if isinstance(lora_config, Mapping):
        try:
            return LoraConfig(**dict(lora_config))
        except TypeError as exc:
            raise ZoftError(
                f"LoRA-GA: bad LoRA configuration arguments ({exc}); see peft.LoraConfig"
            ) from None
    raise ZoftError(
        f"LoRA-GA: lora_config must be a peft LoraConfig or a dict, got {type(lora_config).__name__}"
    )


def _target_modules(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs LoRA-GA initializes: peft's rule (nn.Linear / Conv1D among targets)."""
    from peft.tuners.lora.loraga import get_target_modules
    from peft.tuners.lora.model import LoraModel

    if config.target_modules is None:
        # peft fills the default targets only inside get_peft_model; the estimation runs before it.
        model_type = LoraModel.get_model_config(model).get("model_type")
        defaults = LoraModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise ZoftError(
                f"LoRA-GA: peft has no default target modules for model type {model_type!r}; "
                "set target_modules in the LoRA config"
            )
        config.target_modules = set(defaults)
    targets = list(get_target_modules(model, config))
    if not targets:
        raise ZoftError(
            f"LoRA-GA: no nn.Linear/Conv1D module matches target_modules={sorted(config.target_modules)}; "
            "name the model's linear layers (e.g. q_proj, v_proj)"
        )
    return targets


def estimate_target_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Mapping[str, Any]],
    num_batches: int,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Average the loss gradient of some weights over ``num_batches`` batches, one gradient alive at a time.

    Only ``weights`` require grad during the passes (so no other parameter gets a gradient), and each
    one's gradient is added into an fp32 buffer by a post-accumulate-grad hook and freed right away:
    the peak is the buffers plus the one gradient autograd is producing, not all gradients at once
    (peft's ``preprocess_loraga`` keeps every target's ``.grad`` until the end, in the model dtype).

    Args:
        model: A transformers model whose forward returns ``.loss`` when the batch has ``labels``.
        weights: Name -> parameter of the weights whose gradient is wanted.
        batches: Model input dicts with ``labels``; the first ``num_batches`` are used.
        num_batches: How many batches to average over (>= 1).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for batches whose loss is not the model's own
            (e.g. verbalizer classification); default ``model(**batch).loss``.

    Returns:
        Name -> the mean gradient (fp32, the parameter's shape and device).

    Raises:
        ZoftError: If ``num_batches < 1``, the data gives fewer batches, or a batch yields no loss.
    """
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ZoftError(f"LoRA-GA: num_batches must be a positive integer, got {num_batches!r}")
    if hasattr(batches, "__len__") and len(batches) < num_batches:
        raise ZoftError(
            f"LoRA-GA needs {num_batches} gradient batches but the data gives only {len(batches)}; "
            f"lower num_batches to at most {len(batches)} or provide more data"
        )
    buffers = {
        name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in weights.items()
    }
    saved_requires_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = []

    def make_hook(buffer: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            buffer.add_(param.grad)
            param.grad = None

        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in weights.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(make_hook(buffers[name])))
        model.train()  # the gradient of the training loss, as in the first training step (peft does the same)
        seen = 0
        iterator = iter(batches)
        while seen < num_batches:
            try:
                batch = next(iterator)
            except StopIteration:
                raise ZoftError(
                    f"LoRA-GA needs {num_batches} gradient batches but the data gave only {seen}; "
                    f"lower num_batches to at most {seen} or provide more data"
                ) from None
            with torch.enable_grad():
                loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
                if loss is None:
                    raise ZoftError("LoRA-GA: the model returned no loss; each batch must contain 'labels'")
                loss.backward()
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_requires_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    for buffer in buffers.values():
        buffer.div_(num_batches)
    return buffers


@torch.no_grad()
def _paper_init(layer, adapter_name: str, grad: torch.Tensor, stable_gamma: float) -> None:
    """The paper's Algorithm 1 on one peft LoRA layer: A, B from G's singular vectors, base offset."""
    from peft.utils.other import transpose

    base = layer.get_base_layer()
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)
    grad = transpose(grad.float(), fan_in_fan_out)  # (out_features, in_features)
    r = layer.r[adapter_name]
    out_features = grad.shape[0]
    if 2 * r > min(grad.shape):
        raise ZoftError(
            f"LoRA-GA needs 2 * r <= min(out, in) features; r={r} is too large for a "
            f"{tuple(grad.shape)} weight; lower r"
        )
    # Randomized SVD as in the authors' code and peft: only the top 2r directions are needed.
    U, _, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    c = out_features**0.25 / stable_gamma**0.5
    dtype = base.weight.dtype
    lora_A = (c * V[:, :r].T).to(dtype).contiguous()
    lora_B = (c * U[:, r : 2 * r]).to(dtype).contiguous()
    layer.lora_A[adapter_name].weight.data = lora_A
    layer.lora_B[adapter_name].weight.data = lora_B
    # Offset with the adapter values as stored (model dtype) so output at step 0 matches the forward.
    offset = layer.scaling[adapter_name] * (lora_B.float() @ lora_A.float())
    weight = transpose(base.weight.data.float(), fan_in_fan_out) - offset
    base.weight.data = transpose(weight, fan_in_fan_out).to(dtype)


def init_lora_ga(
    model: nn.Module,
    lora_config: Any,
    batches: Iterable[Mapping[str, Any]],
    num_batches: int,
    *,
    scale: Scale = "paper",
    stable_gamma: float = 16.0,
    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r",
    adapter_name: str = "default",
    initial_adapter_dir: str | os.PathLike | None = None,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
):
    """Wrap ``model`` with LoRA adapters initialized by LoRA-GA.

    The base model is modified in place (its target weights are offset), then wrapped with peft.

    Args:
        model: A transformers model (not yet a PeftModel) whose forward returns ``.loss`` given labels.
        lora_config: A ``peft.LoraConfig`` or a dict of its arguments (r, lora_alpha, target_modules, ...).
            It is copied; its ``init_lora_weights`` is replaced by what ``scale`` needs.
        batches: Model input dicts (input_ids, attention_mask, labels, ...) on the model's device;
            the first ``num_batches`` are used to estimate the gradient.
        num_batches: How many batches to average the gradient over (the paper uses a few dozen samples).
        scale: ``"paper"`` (the paper's Algorithm 1, default) or one of peft's ``lora_ga`` scalings
            ``"stable"``, ``"unit"``, ``"weight_svd"``, ``"gd_scale"`` (see the module docstring).
        stable_gamma: The paper's gamma: factors are scaled by ``out_features**0.25 / sqrt(gamma)``;
            larger gamma means smaller adapters at step 0 (used by "paper" and peft's "stable").
        direction: peft's split of the 2r singular directions between A and B (peft scalings only;
            "paper" uses A <- the first r, B <- the next r, which is peft's "ArB2r").
        adapter_name: Name of the adapter in the returned PeftModel.
        initial_adapter_dir: If given, the adapter at step 0 is saved there (with
            ``init_lora_weights=True`` in its config, as peft's conversion requires), and remembered on
            the returned model for :func:`save_lora_ga_adapter`.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` when the training loss is not the model's own
            ``labels`` loss (e.g. verbalizer classification); default ``model(**batch).loss``.

    Returns:
        The ``peft.PeftModel``; its output equals the original model's (up to rounding of the offset).

    Raises:
        ZoftError: No or a non-LoRA config, an unknown scale, no matching linear targets, too few
            batches, batches without labels, or r too large for a weight.
    """
    from peft import LoraGAConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer

    if hasattr(model, "peft_config"):
        raise ZoftError("LoRA-GA initializes a model before peft wraps it; pass the base model, not a PeftModel")
    config = _as_lora_config(lora_config)
    if scale != "paper" and scale not in PEFT_SCALES:
        raise ZoftError(f"LoRA-GA: unknown scale {scale!r}; use 'paper' or one of {', '.join(PEFT_SCALES)}")
    if getattr(config, "use_dora", False):
        raise ZoftError("LoRA-GA initializes plain LoRA; set use_dora=False")
    targets = _target_modules(model, config)
    grads = estimate_target_gradients(
        model, {name: module.weight for name, module in targets}, batches, num_batches, loss_fn
    )
    attr = _ZOFT_GRAD_ATTR if scale == "paper" else _PEFT_GRAD_ATTR
    for name, module in targets:
        setattr(module, attr, grads.pop(name))
    if scale == "paper":
        config.init_lora_weights = True
        config.lora_ga_config = None
    else:
        config.init_lora_weights = "lora_ga"
        # peft annotates stable_gamma as int but computes with it as a number: 2.5 must stay 2.5, and
        # 0.5 must not become 0 (a division by zero).
        config.lora_ga_config = LoraGAConfig(direction=direction, scale=scale, stable_gamma=float(stable_gamma))
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        if scale == "paper":
            for module in peft_model.modules():
                base = module.get_base_layer() if isinstance(module, LoraLayer) else None
                if base is not None and hasattr(base, _ZOFT_GRAD_ATTR) and adapter_name in module.lora_A:
                    _paper_init(module, adapter_name, getattr(base, _ZOFT_GRAD_ATTR), stable_gamma)
                    delattr(base, _ZOFT_GRAD_ATTR)
    finally:
        leftover = [name for name, module in targets if hasattr(module, attr)]
        for _, module in targets:
            if hasattr(module, attr):
                delattr(module, attr)
    if leftover:
        # peft silently falls back to its default init when the gradient is not consumed.
        raise RuntimeError(f"LoRA-GA gradients were not used for {leftover[:3]} (peft API change?)")
    if initial_adapter_dir is not None:
        save_initial_adapter(peft_model, initial_adapter_dir, adapter_name=adapter_name)
    return peft_model


def save_initial_adapter(peft_model, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Save the step-0 adapter, as peft's conversion to a plain LoRA adapter needs it.

    Call this before training. The saved config says ``init_lora_weights=True`` so that loading it
    does not re-run an initialization that offsets the base weights again.

    Args:
        peft_model: The PeftModel returned by :func:`init_lora_ga`, not yet trained.
        directory: Folder to write the adapter into (created if missing).
        adapter_name: The adapter to save.
    """
    config = peft_model.peft_config[adapter_name]
    saved = (config.init_lora_weights, getattr(config, "lora_ga_config", None))
    config.init_lora_weights = True
    config.lora_ga_config = None
    try:
        # peft writes a non-default adapter into a subfolder; keep the folder layout the caller asked for.
        peft_model.save_pretrained(os.fspath(directory), selected_adapters=[adapter_name])
        if adapter_name != "default":
            _flatten_adapter_folder(os.fspath(directory), adapter_name)
    finally:
        config.init_lora_weights, config.lora_ga_config = saved
    setattr(peft_model, _INITIAL_DIR_ATTR, os.fspath(directory))


def _flatten_adapter_folder(directory: str, adapter_name: str) -> None:
    sub = os.path.join(directory, adapter_name)
    for entry in os.listdir(sub):
        os.replace(os.path.join(sub, entry), os.path.join(directory, entry))
    os.rmdir(sub)


def save_lora_ga_adapter(
    peft_model,
    save_directory: str | os.PathLike,
    initial_adapter_dir: str | os.PathLike | None = None,
    adapter_name: str = "default",
) -> None:
    """Save a trained LoRA-GA adapter as a plain rank-2r LoRA adapter for the ORIGINAL base model.

    Uses peft's conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``):
    ``delta W = s (B A - B0 A0) = s [B | -B0] [A ; A0]``, so the saved adapter has rank ``2r`` and
    ``lora_alpha`` adjusted to keep the scaling. Anyone can load it without zoft:
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), save_directory)``.

    Args:
        peft_model: The trained PeftModel from :func:`init_lora_ga`.
        save_directory: Where to write the converted adapter.
        initial_adapter_dir: The step-0 adapter folder; defaults to the one :func:`init_lora_ga`
            saved (its ``initial_adapter_dir`` argument).
        adapter_name: The adapter to convert.

    Raises:
        ZoftError: If no initial adapter folder is known or it does not exist.
    """
    initial = (
        initial_adapter_dir
        if initial_adapter_dir is not None
        else getattr(peft_model, _INITIAL_DIR_ATTR, None)
    )
    if initial is None:
        raise ZoftError(
            "LoRA-GA: converting to a plain LoRA adapter needs the step-0 adapter; pass initial_adapter_dir "
            "to init_lora_ga (or call save_initial_adapter before training)"
        )
    initial = os.path.abspath(os.fspath(initial))
    if not os.path.isfile(os.path.join(initial, "adapter_config.json")):
        raise ZoftError(f"LoRA-GA: no initial adapter in {initial!r} (adapter_config.json missing)")
    config = peft_model.peft_config[adapter_name]
    saved = (config.init_lora_weights, getattr(config, "lora_ga_config", None))
    # The saved (converted) config must not ask peft to redo LoRA-GA on load.
    config.init_lora_weights = True
    config.lora_ga_config = None
    try:
        peft_model.save_pretrained(
            os.fspath(save_directory),
            selected_adapters=[adapter_name],
            path_initial_model_for_weight_conversion=initial,
        )
        if adapter_name != "default":
            _flatten_adapter_folder(os.fspath(save_directory), adapter_name)
    finally:
        config.init_lora_weights, config.lora_ga_config = saved


__all__ = [
    "PEFT_SCALES",
    "estimate_target_gradients",
    "init_lora_ga",
    "save_initial_adapter",
    "save_lora_ga_adapter",
]
