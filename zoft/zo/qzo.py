"""QZO: zeroth-order fine-tuning of a 4-bit model through its quantization scales only.

Paper: "Fine-tuning Quantized Neural Networks with Zeroth-order Optimization" (2025),
https://arxiv.org/abs/2505.13430. The linear layers are NF4 (bitsandbytes storage: packed 4-bit codes +
one fp32 ``absmax`` per block); the codes never change and only the per-block scales are perturbed and
updated by MeZO's two-forward SPSA step, with the projected gradient clipped to [-C, C] (default 100) and
the scales clamped positive after each update. It saves weight memory (4.5 bits per quantized weight) on
top of what MeZO saves (gradients, optimizer state, activations).

The model side lives in :mod:`zoft.zo.quant4bit`; this module prepares a model for QZO and holds the
clipping rule. The ZO step itself is MeZO's (:class:`zoft.zo.mezo.MeZOOptimizer` with ``clip=``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from zoft.errors import ZoftError
from zoft.zo import quant4bit as q4

DEFAULT_CLIP = 100.0


def has_bnb_4bit_layers(model: nn.Module) -> bool:
    """Whether the model holds bitsandbytes ``Linear4bit`` layers (it was loaded from an NF4 folder)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def prepare_qzo_model(
    model: nn.Module,
    quantization: str | None = None,
    *,
    blocksize: int = q4.DEFAULT_BLOCKSIZE,
    target_modules: str | Sequence[str] = "all-linear",
    model_name: str = "the model",
) -> list[str]:
    """Make a model ready for QZO in place: NF4 linear layers, only their scales trainable.

    A model loaded from a bitsandbytes NF4 folder keeps its codes and scales (its ``Linear4bit`` layers
    become :class:`~zoft.zo.quant4bit.NF4Linear`); a full-precision model is quantized when
    ``quantization == "nf4"``.

    Args:
        model: a Hugging Face model, full precision or loaded with bitsandbytes NF4 layers.
        quantization: ``"nf4"`` to quantize a full-precision model, ``None`` to require a quantized one.
        blocksize: NF4 block size when quantizing here.
        target_modules: ``"all-linear"`` or linear-layer name suffixes to quantize here.
        model_name: how the model is named in error messages (the recipe's model.name).

    Returns:
        The names of the trainable parameters (the ``absmax`` scales).

    Raises:
        ZoftError: if the model is not quantized and ``quantization`` is not set, or nothing matched.
    """
    if has_bnb_4bit_layers(model):
        q4.convert_bnb_model(model)
    elif not q4.nf4_layers(model):
        if quantization is None:
            raise ZoftError(
                f"method 'qzo' trains 4-bit quantization scales but {model_name} is not quantized; "
                "set model.quantization: nf4 or use a bitsandbytes NF4 checkpoint"
            )
        if quantization != "nf4":
            raise ZoftError(f"model.quantization: {quantization!r} is not supported; use nf4")
        q4.quantize_model_nf4(model, target_modules=target_modules, blocksize=blocksize)
    return q4.mark_only_scales_trainable(model)


def clip_projected_grad(g: float, bound: float | None) -> tuple[float, bool]:
    """QZO's directional-derivative clipping: ``g`` limited to ``[-bound, bound]``.

    A quantized model's loss can jump when a perturbation moves a scale across a rounding-sensitive
    region; one such spike times a large z would wreck the scales, so the scalar is bounded before use.

    Args:
        g: the projected gradient ``(L+ - L-) / (2 eps)``.
        bound: the bound C (> 0), or ``None`` for no clipping.

    Returns:
        ``(clipped g, whether it was clipped)``.
    """
    if bound is None or abs(g) <= bound:
        return g, False
    if math.isnan(g):
        # A NaN loss would poison every scale; no information means no step.
        return 0.0, True
    return math.copysign(bound, g), True
