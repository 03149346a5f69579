"""Load the base model and tokenizer (asset name, hub id or local folder) and wrap it with peft."""

from __future__ import annotations

from pathlib import Path

import torch

from zoft import assets
from zoft.errors import ZoftError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_name(name: str) -> str:
    """An asset name becomes its local folder; a missing local path is an error; else a hub id."""
    if assets.is_model_asset(name):
        return assets.model_asset_path(name)
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ZoftError(f"model.name: folder {name} not found")
    return name


def _load_error(what: str, name: str, err: Exception) -> ZoftError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ZoftError(
        f"model.name: cannot load {what} '{name}': {first[:300]} "
        f"(check the name; hub ids need network access, assets: {', '.join(assets.MODEL_ASSETS)})"
    )


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", name, e) from None
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padded positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str,
    *,
    task: str = "causal_lm",
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
):
    """Load a causal LM or sequence classifier. Tied weights (embedding = head) stay one parameter."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_name(name)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype]}
    try:
        if task == "sequence_classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error("model", name, e) from None
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def peft_config(peft_cfg, task: str = "causal_lm"):
    """The peft config (LoraConfig / PrefixTuningConfig) of the recipe's peft section."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    task_type = TaskType.SEQ_CLS if task == "sequence_classification" else TaskType.CAUSAL_LM
    if peft_cfg.method == "lora":
        return LoraConfig(
            task_type=task_type,
            r=peft_cfg.r,
            lora_alpha=peft_cfg.alpha,
            lora_dropout=peft_cfg.dropout,
            target_modules=peft_cfg.target_modules,
        )
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft_cfg.num_virtual_tokens)


def apply_peft(model, peft_cfg, task: str = "causal_lm"):
    """Wrap ``model`` with the recipe's peft adapter; only the adapter's parameters stay trainable."""
    from peft import get_peft_model

    config = peft_config(peft_cfg, task)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise ZoftError(f"peft: {first[:300]} (set peft.target_modules to module names of this model)") from None


def count_parameters(model) -> tuple[int, int]:
    def numel(p):  # under DeepSpeed ZeRO-3 a parameter holds only this rank's shard; ds_numel is its size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
