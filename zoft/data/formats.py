"""Turn rows into token ids for each recipe format, checking every row.

Formats:
- ``text``: causal LM on a text column (optionally packed into max_length blocks);
- ``prompt_completion``: loss on the completion tokens only;
- ``chat``: a list of {role, content} messages rendered with the tokenizer's chat template,
  loss on the assistant turns only;
- ``classification``: a prompt template plus one verbalizer word per label. With a causal LM the
  loss is cross-entropy over the candidate words' log-probabilities after the prompt (the MeZO
  setting); with a sequence classifier it is the usual classification head.

A missing column or a malformed row raises :class:`~zoft.errors.DataError` naming the source and
the row (1-based, counting data rows only).
"""

from __future__ import annotations

import string
from typing import Any

from zoft.errors import DataError


def _require_columns(ds, columns: list[str], source: str, hint: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: column '{missing[0]}' not found (columns: {', '.join(ds.column_names)}); {hint}"
        )


def _text(value: Any, column: str, source: str, row: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source} row {row}: column '{column}' should be text, got {type(value).__name__} {value!r}")
    return value


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def tokenize_text(ds, tokenizer, cfg, source: str) -> dict[str, list]:
    _require_columns(ds, [cfg.text_column], source, "set data.text_column")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids_list = []
    for i, row in enumerate(ds, start=1):
        text = _text(row[cfg.text_column], cfg.text_column, source, i)
        if not text.strip():
            continue  # blank lines of text files are not examples
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + eos
        ids_list.append(ids if cfg.packing else ids[: cfg.max_length])
    if cfg.packing:
        flat = [t for ids in ids_list for t in ids]
        n = len(flat) // cfg.max_length
        ids_list = [flat[j * cfg.max_length : (j + 1) * cfg.max_length] for j in range(n)]
    return {"input_ids": ids_list, "labels": [list(x) for x in ids_list]}


def tokenize_prompt_completion(ds, tokenizer, cfg, source: str) -> dict[str, list]:
    _require_columns(
        ds, [cfg.prompt_column, cfg.completion_column], source, "set data.prompt_column / data.completion_column"
    )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for i, row in enumerate(ds, start=1):
        prompt = _text(row[cfg.prompt_column], cfg.prompt_column, source, i)
        completion = _text(row[cfg.completion_column], cfg.completion_column, source, i)
        if not completion.strip():
            raise DataError(f"{source} row {i}: column '{cfg.completion_column}' is empty (nothing to learn)")
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = (tokenizer(completion, add_special_tokens=False)["input_ids"] + eos)[: cfg.max_length]
        p = p[max(0, len(p) - (cfg.max_length - len(c))) :] if len(p) + len(c) > cfg.max_length else p
        out["input_ids"].append(p + c)
        out["labels"].append([-100] * len(p) + c)
    return out


def tokenize_chat(ds, tokenizer, cfg, source: str) -> dict[str, list]:
    _require_columns(ds, [cfg.messages_column], source, "set data.messages_column")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: the tokenizer has no chat template; use data.format prompt_completion, "
            "or a model whose tokenizer defines one"
        )
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for i, row in enumerate(ds, start=1):
        messages = row[cfg.messages_column]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)
        ):
            raise DataError(
                f"{source} row {i}: column '{cfg.messages_column}' should be a list of "
                "{{role, content}} messages, got {messages!r}".format(messages=messages)[:300]
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{source} row {i}: no assistant message (nothing to learn)")
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # The assistant span = tokens between the prompt for turn j and the text through turn j.
            before = tokenizer.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: j + 1], tokenize=False)
            start = len(tokenizer(before, add_special_tokens=False)["input_ids"])
            end = len(tokenizer(through, add_special_tokens=False)["input_ids"])
            labels[start:end] = ids[start:end]
        out["input_ids"].append(ids[: cfg.max_length])
        out["labels"].append(labels[: cfg.max_length])
    return out


def verbalizer_candidates(tokenizer, cfg) -> tuple[list[str], list[list[int]]]:
    """Label values in a fixed order and each verbalizer word's token ids."""
    labels = list(cfg.verbalizers)
    candidates = []
    for label in labels:
        ids = tokenizer(cfg.verbalizers[label], add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"data.verbalizers.{label}: the word {cfg.verbalizers[label]!r} has no tokens")
        candidates.append(ids)
    return labels, candidates


def tokenize_classification(ds, tokenizer, cfg, source: str) -> dict[str, list]:
    template = cfg.template or "{" + cfg.text_column + "}"
    fields = template_fields(template)
    _require_columns(ds, fields, source, "data.template may only name columns as {column}")
    _require_columns(ds, [cfg.label_column], source, "set data.label_column")
    labels = list(cfg.verbalizers)
    out: dict[str, list] = {"input_ids": [], "cls_label": []}
    for i, row in enumerate(ds, start=1):
        values = {f: _text(row[f], f, source, i) for f in fields}
        label = row[cfg.label_column]
        if label is None or str(label) not in cfg.verbalizers:
            raise DataError(
                f"{source} row {i}: label {label!r} is not one of the verbalizer labels ({', '.join(labels)})"
            )
        ids = tokenizer(template.format_map(values), add_special_tokens=True)["input_ids"]
        out["input_ids"].append(ids[-cfg.max_length :])  # keep the end: the template's cue words
        out["cls_label"].append(labels.index(str(label)))
    return out


TOKENIZERS = {
    "text": tokenize_text,
    "prompt_completion": tokenize_prompt_completion,
    "chat": tokenize_chat,
    "classification": tokenize_classification,
}
