"""The recipe reference (README section) generated from the schema, so docs and code agree.

    python -m zoft.reference            # print it
    python -m zoft.reference --write    # update README.md between its markers
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from zoft.config import Recipe, ReservedSection, TrainSection

START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    for name in ("str", "int", "float", "bool"):
        text = text.replace(f"<class '{name}'>", name)
    return text.replace("|", "\\|")


def _sections(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        subs = [a for a in typing.get_args(ann) or (ann,) if isinstance(a, type) and issubclass(a, BaseModel)]
        if subs and subs[0] is not ReservedSection:
            yield from _sections(subs[0], prefix + name + ".")
        elif not subs:
            yield prefix + name, field


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in _sections(Recipe):
        default = "required" if field.is_required() else (
            "(computed)" if field.default_factory is not None and not isinstance(field.default_factory(), (list, dict)) else
            repr(field.default_factory() if field.default_factory is not None else field.default)
        )
        desc = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{key}` | {_type_name(field.annotation)} | `{default}` | {desc} |")
    reserved = [n for n, f in Recipe.model_fields.items() if ReservedSection in typing.get_args(f.annotation)]
    if reserved:
        lines.append("")
        lines.append("Reserved sections (no options in this version): " + ", ".join(f"`{n}`" for n in reserved) + ".")
    lines.append("")
    lines.append(
        "`train` also accepts any other `transformers.TrainingArguments` field by its HF name "
        f"(typed above: {', '.join(f'`{k}`' for k in TrainSection.model_fields)}); "
        "`output_dir`, `resume_from_checkpoint` and `overwrite_output_dir` come from `output`."
    )
    return "\n".join(lines)


def update_readme(path: Path) -> None:
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + "\n" + reference_markdown() + "\n" + END + tail)


if __name__ == "__main__":
    if "--write" in sys.argv:
        update_readme(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(reference_markdown())
