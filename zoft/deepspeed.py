"""DeepSpeed ZeRO for first-order recipes (``train.deepspeed``, HF's key): what zoft checks first.

HF's Trainer runs DeepSpeed itself; zoft reads the JSON only to refuse, at validation, the
combinations that cannot work (see :func:`combination_problem`) and to say so in one line.
Shipped configs: configs/deepspeed/zero1.json, zero2.json, zero3.json ("auto" values that HF fills
from the recipe's train section).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from zoft.errors import ZoftError

SHIPPED = "configs/deepspeed/zero1.json, zero2.json or zero3.json"


def require_deepspeed() -> None:
    """Raises: ZoftError: the deepspeed package is not installed (with the pip command)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ZoftError("train.deepspeed: needs the deepspeed package: pip install 'zoft[deepspeed]'")


def read_config(value: Any) -> dict:
    """The DeepSpeed config that ``train.deepspeed`` names: a JSON file path (or an inline mapping).

    Raises:
        ValueError: one line: not found, not JSON, not a mapping, or a ZeRO stage that does not exist.
    """
    if isinstance(value, dict):
        config, where = value, "the inline config"
    else:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"train.deepspeed: expected the path of a DeepSpeed JSON file (e.g. {SHIPPED}), got {value!r}")
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"train.deepspeed: {value} not found; give the path of a DeepSpeed JSON file, e.g. {SHIPPED}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"train.deepspeed: {value} is not valid JSON: {e.msg} (line {e.lineno})") from None
        where = value
    if not isinstance(config, dict):
        raise ValueError(f"train.deepspeed: {where} must hold a JSON object (a mapping of DeepSpeed settings)")
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"train.deepspeed: zero_optimization.stage in {where} must be 0, 1, 2 or 3, got {stage!r}")
    return config


def zero_stage(config: dict) -> Any:
    """The ZeRO stage of a DeepSpeed config (0 when it has no zero_optimization section)."""
    section = config.get("zero_optimization") or {}
    return section.get("stage", 0) if isinstance(section, dict) else section


def combination_problem(
    config: dict,
    *,
    method: str,
    zeroth_order: bool,
    sections: list[str],
    privacy: str | None,
    peft_init: str | None,
    peft_optimizer: str | None,
) -> str | None:
    """One line naming the keys and the reason when DeepSpeed cannot run this recipe; None when it can.

    Args:
        config: the DeepSpeed config (:func:`read_config`).
        method: method.name; zeroth_order: whether it is a ZO method.
        sections: the recipe's zoft-only execution sections present (``offload``, ``distributed``).
        privacy: privacy.method or None; peft_init / peft_optimizer: peft.init / peft.optimizer or None.
    """
    stage = zero_stage(config)
    zero = f"ZeRO-{stage}"
    if sections:
        key = sections[0]
        what = "ZO2 block offloading" if key == "offload" else "DistZO2 (zeroth-order over several processes)"
        return (
            f"train.deepspeed with the {key} section: {what} is zoft's own zeroth-order path and DeepSpeed "
            "drives first-order training; drop one of them"
        )
    if zeroth_order:
        if stage == 3:
            return (
                f"train.deepspeed: ZeRO-3 shards every parameter across ranks, and method '{method}' perturbs and "
                "updates whole parameters in place (each rank would see only its shard); drop train.deepspeed "
                "(several GPUs: the distributed section, DistZO2)"
            )
        return (
            f"train.deepspeed: {zero} shards gradients and optimizer states, which method '{method}' "
            "(zeroth-order) does not have, and DeepSpeed's engine would replace the ZO update with its own "
            "gradient step; drop train.deepspeed (several GPUs: the distributed section, DistZO2; less "
            "memory: the offload section, ZO2)"
        )
    if privacy is not None:
        return (
            f"train.deepspeed with privacy.method '{privacy}': per-example clipping hooks on every layer and "
            "noise added before the optimizer step need zoft's step, but DeepSpeed's engine buckets, reduces "
            "and applies the gradients itself; drop train.deepspeed (a private run is one process)"
        )
    if method == "natural_galore":
        # ZeRO hands the optimizer flat fp32 partitions of the weights, so there is no matrix left to take
        # the SVD of; the layer-wise variant also steps inside the backward, before ZeRO reduces anything.
        return (
            f"train.deepspeed with method 'natural_galore': {zero} gives the optimizer flattened, partitioned "
            "weights, while Natural GaLore projects each weight matrix's gradient (and the layer-wise variant "
            "steps during the backward); drop train.deepspeed (several GPUs: launch without it, DDP, layerwise: false)"
        )
    if peft_optimizer == "lora_pro":
        return (
            "train.deepspeed with peft.optimizer 'lora_pro': LoRA-Pro's optimizer needs each adapter's whole "
            f"A and B matrices and their gradients, which {zero} flattens and partitions across ranks; drop "
            "train.deepspeed (several GPUs: launch without it, DDP)"
        )
    if peft_init == "lora_ga" and stage == 3:
        return (
            "train.deepspeed: ZeRO-3 partitions the weights while the model loads, and peft.init 'lora_ga' "
            "needs them whole for its gradient SVD; use ZeRO-1/2 (configs/deepspeed/zero2.json) with lora_ga"
        )
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and method == "sgd":
        return (
            f"train.deepspeed: the DeepSpeed config has an optimizer section ({optimizer.get('type', '?')}), "
            "which would replace method 'sgd'; remove that section so HF builds the recipe's optimizer"
        )
    return None
