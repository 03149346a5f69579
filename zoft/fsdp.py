"""FSDP for first-order recipes (``train.fsdp``, HF's key, or ``accelerate launch`` with an FSDP config).

HF's Trainer runs FSDP itself, through accelerate: each rank keeps a shard of every wrapped weight
(and of its gradient) and gathers the whole tensor only inside the forward and backward of its
module. zoft's methods that read or write whole tensors outside those passes cannot run on shards:
the zeroth-order step (it perturbs and updates every weight in place between forwards), LoRA-Pro
(it solves with each adapter's whole A and B), Natural GaLore (the SVD of each weight's gradient) and
FlashDP (per-layer clipping hooks and zoft's own noisy step). :func:`combination_problem` names the
keys and the alternative in one line, as :func:`zoft.deepspeed.combination_problem` does for ZeRO.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

TRAIN_KEY = "train.fsdp"
# accelerate launch with an FSDP config (--use_fsdp, or distributed_type: FSDP) sets this for every rank;
# HF's Trainer then wraps the model in FSDP even when the recipe has no train.fsdp.
ACCELERATE_ENV = "ACCELERATE_USE_FSDP"
ACCELERATE_SOURCE = f"accelerate launch with FSDP ({ACCELERATE_ENV}=true)"


def fsdp_requested(value: Any) -> bool:
    """Whether a ``train.fsdp`` value turns FSDP on (HF: "", None, False or [] mean off)."""
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple)):
        return any(fsdp_requested(v) for v in value)
    return bool(value)


def accelerate_fsdp_launch(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by ``accelerate launch`` with an FSDP config."""
    env = os.environ if environ is None else environ
    return env.get(ACCELERATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def combination_problem(
    source: str,
    *,
    method: str,
    zeroth_order: bool,
    sections: list[str],
    privacy: str | None,
    peft_optimizer: str | None,
) -> str | None:
    """One line naming the keys and the reason when FSDP cannot run this recipe; None when it can.

    Args:
        source: what asks for FSDP: :data:`TRAIN_KEY` or :data:`ACCELERATE_SOURCE`.
        method: method.name; zeroth_order: whether it is a ZO method.
        sections: the recipe's zoft-only execution sections present (``offload``, ``distributed``).
        privacy: privacy.method or None; peft_optimizer: peft.optimizer or None.
    """
    if source == TRAIN_KEY:
        drop = "drop train.fsdp"
    else:
        drop = "launch without the FSDP config (accelerate launch --multi_gpu gives DDP)"
    if sections:
        key = sections[0]
        what = "ZO2 block offloading" if key == "offload" else "DistZO2 (zeroth-order over several processes)"
        return (
            f"{source} with the {key} section: {what} is zoft's own zeroth-order path, and FSDP shards the "
            f"weights for first-order training; {drop} or the {key} section"
        )
    if zeroth_order:
        return (
            f"{source}: FSDP shards every weight across ranks, and method '{method}' perturbs and updates whole "
            f"weights in place between forwards (each rank would see only its shard); {drop} (several GPUs: the "
            "distributed section, DistZO2; less memory: the offload section, ZO2)"
        )
    if privacy is not None:
        return (
            f"{source} with privacy.method '{privacy}': per-example clipping hooks on every layer and noise "
            f"added before the optimizer step need zoft's step on whole weights, but FSDP shards the weights and "
            f"reduces the gradients itself; {drop} (a private run is one process)"
        )
    if method == "natural_galore":
        return (
            f"{source} with method 'natural_galore': FSDP gives the optimizer flattened shards of the weights, "
            f"while Natural GaLore takes the SVD of each whole weight matrix's gradient; {drop} (several GPUs: "
            "DDP, with method.layerwise: false)"
        )
    if peft_optimizer == "lora_pro":
        return (
            f"{source} with peft.optimizer 'lora_pro': LoRA-Pro's optimizer needs each adapter's whole A and B "
            f"matrices and their gradients, which FSDP shards across ranks; {drop} (several GPUs: DDP)"
        )
    return None


def recipe_problem(recipe, source: str) -> str | None:
    """:func:`combination_problem` for a validated (or being validated) :class:`zoft.config.Recipe`."""
    return combination_problem(
        source,
        method=recipe.method.name,
        zeroth_order=recipe.method.is_zeroth_order,
        sections=[k for k in ("offload", "distributed") if getattr(recipe, k) is not None],
        privacy=recipe.privacy.method if recipe.privacy is not None else None,
        peft_optimizer=recipe.peft.optimizer if recipe.peft is not None else None,
    )
