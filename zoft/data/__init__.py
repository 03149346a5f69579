"""Data sets for a recipe: load the source, split off held-out rows, tokenize, pick a collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zoft.data.collate import CausalLMCollator, SequenceClassificationCollator, VerbalizerCollator
from zoft.data.formats import TOKENIZERS, verbalizer_candidates
from zoft.data.sources import load_source
from zoft.errors import DataError


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset of token ids
    eval: Any | None
    collator: Any
    kind: str  # "lm", "verbalizer" or "sequence_classification"
    label_names: list[str] | None = None


def build_datasets(cfg, tokenizer, task: str = "causal_lm") -> DataBundle:
    """Build tokenized train/eval sets for the recipe's ``data`` section.

    Args:
        cfg: the recipe's data section (``zoft.config.DataSection``).
        tokenizer: the model's tokenizer (a pad token is set by :func:`zoft.models.load_tokenizer`).
        task: ``causal_lm`` or ``sequence_classification``.
    """
    import datasets

    train_rows = load_source(cfg.train, split=cfg.split, key="data.train")
    if cfg.eval:
        eval_rows = load_source(cfg.eval, split=cfg.split, key="data.eval")
    else:
        if len(train_rows) < 2:
            raise DataError(f"data.train: {cfg.train} has {len(train_rows)} row(s); a held-out split needs at least 2")
        parts = train_rows.train_test_split(test_size=cfg.test_size, seed=cfg.split_seed)
        train_rows, eval_rows = parts["train"], parts["test"]
    if cfg.max_train_samples:
        train_rows = train_rows.select(range(min(cfg.max_train_samples, len(train_rows))))
    if eval_rows is not None and cfg.max_eval_samples:
        eval_rows = eval_rows.select(range(min(cfg.max_eval_samples, len(eval_rows))))

    tokenize = TOKENIZERS[cfg.format]
    train = datasets.Dataset.from_dict(tokenize(train_rows, tokenizer, cfg, source=f"data.train ({cfg.train})"))
    evalset = None
    if eval_rows is not None:
        src = cfg.eval or cfg.train
        evalset = datasets.Dataset.from_dict(tokenize(eval_rows, tokenizer, cfg, source=f"data.eval ({src})"))
    if len(train) == 0:
        raise DataError(f"data.train: {cfg.train} gave no usable examples")

    if cfg.format != "classification":
        return DataBundle(train, evalset, CausalLMCollator(tokenizer.pad_token_id), "lm")
    labels, candidates = verbalizer_candidates(tokenizer, cfg)
    if task == "sequence_classification":
        return DataBundle(train, evalset, SequenceClassificationCollator(tokenizer.pad_token_id), task, labels)
    return DataBundle(train, evalset, VerbalizerCollator(tokenizer.pad_token_id, candidates, cfg.verbalizer_score), "verbalizer", labels)
