"""``zoft export``: turn a run (or a peft adapter) into a standard Hugging Face checkpoint.

A LoRA run saves an adapter, a QZO run a bitsandbytes NF4 folder: both need peft or bitsandbytes
(and the base model) to load. Export writes what any ``AutoModelForCausalLM.from_pretrained`` loads
with neither installed: LoRA adapters merged into the base weights, NF4 weights dequantized
(4-bit code level x tuned scale, the very product the NF4 layer computes), safetensors + config +
tokenizer, in the recipe's dtype. Merging and dequantizing run in float32 (so export needs about
4 bytes of RAM per parameter); the cast to the target dtype comes last.

The output is written into a hidden sibling folder and renamed into place when complete, so an
interrupted export never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from zoft.errors import ZoftError

RECIPE_FILE = "recipe.yaml"  # zoft.run.RECIPE_FILE (not imported: export must not pull in the trainer)
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_QUANT_STATE = ".weight.quant_state.bitsandbytes__nf4"
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class ExportResult:
    """What :func:`export` wrote: ``kind`` is ``lora`` (merged), ``nf4`` (dequantized) or ``full`` (re-saved)."""

    out: Path
    kind: str
    base: str | None
    dtype: str
    merged_modules: int


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ZoftError(f"{path}: cannot read {what} ({type(e).__name__}); the folder is damaged or incomplete") from None
    if not isinstance(data, dict):
        raise ZoftError(f"{path}: {what} is not a JSON object; the folder is damaged")
    return data


def _find_recipe(src: Path):
    """The run's recipe: ``src/recipe.yaml``, or the parent run's for a ``checkpoint-N`` folder; else None."""
    from zoft.config import load_recipe

    for folder in (src, src.parent) if _CHECKPOINT.match(src.name) else (src,):
        if (folder / RECIPE_FILE).is_file():
            return load_recipe(folder / RECIPE_FILE)
    return None


def nf4_quantization_config(config) -> dict | None:
    """The bitsandbytes 4-bit NF4 ``quantization_config`` of a model config as a dict, or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        return None
    return qc


def _safetensors_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if not files:
        raise ZoftError(f"{folder}: no *.safetensors weights next to config.json; the model folder is incomplete")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def dequantize_nf4_state(state: dict) -> tuple[dict, int]:
    """Replace every bitsandbytes NF4 layer's entries of a state dict by one float32 ``weight``.

    A layer saved by bitsandbytes (or zoft's ``NF4Linear``) has ``X.weight`` (packed uint8 codes),
    ``X.weight.absmax`` (per-block scales; 8-bit codes when double-quantized), ``X.weight.quant_map`` and
    ``X.weight.quant_state.bitsandbytes__nf4`` (JSON: shape, blocksize, dtype, nested-quantization
    parameters). The weight is rebuilt with :func:`zoft.zo.quant4bit.nf4_dequantize`, the function the
    NF4 layer's own forward uses.

    Args:
        state: the checkpoint's tensors; not modified.

    Returns:
        ``(new state, number of dequantized layers)``.

    Raises:
        ZoftError: for a layer that is not NF4 (FP4) or whose entries are incomplete.
    """
    import torch

    from zoft.zo import quant4bit as q4

    state = dict(state)
    layers = sorted(k[: -len(_QUANT_STATE)] for k in state if k.endswith(_QUANT_STATE))
    for name in layers:
        meta = json.loads(bytes(state.pop(name + _QUANT_STATE).tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ZoftError(f"{name}: 4-bit type {meta.get('quant_type')!r} is not supported; export handles nf4")
        try:
            codes, absmax = state.pop(name + ".weight"), state.pop(name + ".weight.absmax")
        except KeyError as e:
            raise ZoftError(f"{name}: the checkpoint lacks {e.args[0]}; the model folder is damaged") from None
        state.pop(name + ".weight.quant_map", None)
        if name + ".weight.nested_absmax" in state:  # double quantization: absmax is itself 8-bit
            absmax = q4._dequantize_nested_absmax(
                absmax,
                state.pop(name + ".weight.nested_absmax"),
                state.pop(name + ".weight.nested_quant_map"),
                int(meta["nested_blocksize"]),
                float(meta["nested_offset"]),
            )
        state[name + ".weight"] = q4.nf4_dequantize(
            codes, absmax, meta["shape"], int(meta["blocksize"]), dtype=torch.float32
        )
    return state, len(layers)


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM


def _task_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    return "sequence_classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def _no_init():
    # Every weight is overwritten by the checkpoint: skip the random init (minutes for a 7B model).
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def load_nf4_dequantized(folder: str | os.PathLike, task: str | None = None):
    """Load a bitsandbytes NF4 folder as a plain float32 model (no bitsandbytes needed).

    Args:
        folder: a Hugging Face folder whose config.json has a bitsandbytes NF4 ``quantization_config``
            (a QZO run's output, or any bnb 4-bit checkpoint).
        task: ``causal_lm`` or ``sequence_classification``; default from the config's architecture.

    Returns:
        ``(model, number of dequantized layers)``: an ordinary float32 model whose config has no
        ``quantization_config``.
    """
    import torch
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    if nf4_quantization_config(config) is None:
        raise ZoftError(f"{folder}: not a bitsandbytes 4-bit checkpoint (config.json has no such quantization_config)")
    del config.quantization_config
    state, n = dequantize_nf4_state(_safetensors_state(folder))
    with _no_init():
        model = _auto_class(task or _task_of(config)).from_config(config, dtype=torch.float32)
    # The file holds each tied tensor once (e.g. embeddings = lm_head); tie_weights restores the share.
    result = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                   strict=False)
    if result.unexpected_keys:
        raise ZoftError(f"{folder}: weights the model does not have: {', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(t) for k, t in tensors.items() if k in state}
    missing = [k for k in result.missing_keys if id(tensors[k]) not in loaded]
    if missing:
        raise ZoftError(f"{folder}: the checkpoint lacks {', '.join(missing[:5])}; the model folder is incomplete")
    return model.eval(), n


def _check_out(out: Path, src: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ZoftError(f"--out: {out} is a file; choose a folder name")
    here, there = out.resolve(), src.resolve()
    if here == there or here in there.parents:
        raise ZoftError(f"--out: {out} holds the folder being exported; choose a folder outside {src}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ZoftError(f"--out: {out} already exists and is not empty; choose another folder or pass --overwrite")


def _write(model, tokenizer, out: Path) -> None:
    tmp = out.parent / f".{out.name}.zoft-export-partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _tokenizer(src: Path, recipe, base: str | None):
    from zoft.models import load_tokenizer

    if (src / "tokenizer_config.json").is_file():
        return load_tokenizer(str(src))
    if recipe is not None:
        m = recipe.model
        return load_tokenizer(m.tokenizer or m.name, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if base is not None:
        return load_tokenizer(base)
    raise ZoftError(f"{src}: no tokenizer files and no base model to take them from; pass --base")


def _merge_lora(src: Path, recipe, base: str | None):
    """Load the base in float32, apply the adapter, merge. Returns (model, base name, merged modules)."""
    from peft import PeftModel

    from zoft.models import load_model, resolve_model_name

    cfg = _read_json(src / ADAPTER_CONFIG, "the adapter config")
    if cfg.get("peft_type") != "LORA":
        raise ZoftError(
            f"{src}: a {cfg.get('peft_type')} adapter cannot be merged into the weights (only LoRA can); "
            "load it with peft's PeftModel instead"
        )
    if recipe is not None and recipe.peft is not None and recipe.peft.init == "lora_ga" and _CHECKPOINT.match(src.name):
        raise ZoftError(
            f"{src}: a LoRA-GA checkpoint's adapter fits the offset base of the running job, not the original "
            f"model; export the run folder {src.parent} (its final adapter is converted)"
        )
    base = base or (recipe.model.name if recipe is not None else None) or cfg.get("base_model_name_or_path")
    if not base:
        raise ZoftError(f"{src}: the adapter does not name its base model; pass --base MODEL_FOLDER_OR_HUB_ID")
    task = recipe.model.task if recipe is not None else (
        "sequence_classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
    )
    if recipe is not None:
        m = recipe.model
        revision, remote = m.revision, m.trust_remote_code
        num_labels = len(recipe.data.verbalizers) if task == "sequence_classification" else None
    else:
        revision, remote, num_labels = cfg.get("revision"), False, None
    from transformers import AutoConfig

    path = resolve_model_name(base)
    try:
        base_config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=remote)
    except (OSError, ValueError) as e:
        raise ZoftError(f"base model '{base}': cannot read its config: {str(e).strip().splitlines()[0][:300]}") from None
    if nf4_quantization_config(base_config) is not None:  # a QLoRA adapter: dequantize the 4-bit base first
        model, _ = load_nf4_dequantized(path, task)
    else:
        model = load_model(base, task=task, dtype="float32", revision=revision, trust_remote_code=remote,
                           num_labels=num_labels)
    try:
        peft_model = PeftModel.from_pretrained(model, str(src))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        # torch's load_state_dict error says what is wrong on its second line ("size mismatch for ...").
        first = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                     lines[0])
        raise ZoftError(f"{src}: the adapter does not fit base model '{base}': {first[:300]}") from None
    from peft.tuners.lora import LoraLayer

    n = sum(isinstance(mod, LoraLayer) for mod in peft_model.modules())
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf instead of writing them
    return merged, base, n, base_config


def _target_dtype(requested: str | None, recipe, stored_config) -> str:
    if requested is not None:
        return requested
    if recipe is not None and recipe.model.dtype != "auto":
        return recipe.model.dtype
    # Read from the config as stored: the loaded model is float32 whatever the checkpoint holds.
    stored = getattr(stored_config, "dtype", None) or getattr(stored_config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return name if name in DTYPE_NAMES else "float32"


def export(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    base: str | None = None,
) -> ExportResult:
    """Write a run's (or adapter's) model as a standard Hugging Face checkpoint.

    Args:
        source: a zoft run folder (with recipe.yaml), one of its ``checkpoint-N`` folders, or any
            peft LoRA adapter folder.
        out: the folder to write (safetensors weights, config.json, tokenizer files).
        overwrite: replace a non-empty ``out``.
        dtype: float32, bfloat16 or float16; default the recipe's ``model.dtype`` (without a recipe, or
            with ``auto``: the dtype the base checkpoint records).
        base: the base model of an adapter (folder, hub id or packaged asset name); default the
            recipe's ``model.name``, else the adapter config's ``base_model_name_or_path``.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ZoftError: one line naming the problem: missing or unrecognised source, existing ``out``, an
            adapter that cannot be merged or does not fit its base.
    """
    src, out = Path(source).expanduser(), Path(out).expanduser()
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ZoftError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if not src.exists():
        raise ZoftError(f"{src}: not found; give a zoft run folder (with recipe.yaml) or a LoRA adapter folder")
    if not src.is_dir():
        raise ZoftError(f"{src}: is a file; give a zoft run folder (with recipe.yaml) or a LoRA adapter folder")
    _check_out(out, src, overwrite)
    recipe = _find_recipe(src)
    if (src / ADAPTER_CONFIG).is_file():
        kind = "lora"
        model, base, n, stored_config = _merge_lora(src, recipe, base)
    elif (src / MODEL_CONFIG).is_file():
        from transformers import AutoConfig

        config = stored_config = AutoConfig.from_pretrained(str(src))
        task = recipe.model.task if recipe is not None else _task_of(config)
        if nf4_quantization_config(config) is not None:
            kind = "nf4"
            model, n = load_nf4_dequantized(src, task)
        elif getattr(config, "quantization_config", None) is not None:
            qc = config.quantization_config
            method = (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method")
            raise ZoftError(f"{src}: a {method} quantized model; export dequantizes bitsandbytes 4-bit (NF4) only")
        else:
            from zoft.models import load_model

            kind, n = "full", 0
            remote = recipe.model.trust_remote_code if recipe is not None else False
            model = load_model(str(src), task=task, dtype="float32", trust_remote_code=remote)
        base = None
    else:
        hint = (
            "it is not a run folder either"
            if recipe is None
            else "the run saved no model (output.save_model false, or it has not finished); "
            "export one of its checkpoint-N folders"
        )
        raise ZoftError(f"{src}: no {ADAPTER_CONFIG} or {MODEL_CONFIG}: nothing to export; {hint}")
    target = _target_dtype(dtype, recipe, stored_config)
    model = model.to(_torch_dtype(target))
    tokenizer = _tokenizer(src, recipe, base)
    _write(model, tokenizer, out)
    return ExportResult(out=out, kind=kind, base=base, dtype=target, merged_modules=n)
