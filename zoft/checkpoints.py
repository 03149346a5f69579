"""Checkpoint completeness: a checkpoint counts only once its marker file exists.

HF Trainer writes a checkpoint folder file by file; a kill in the middle leaves a folder that
looks like a checkpoint. zoft writes ``zoft-complete.json`` (atomically: temp file + rename) after
HF's save returns, and resumes only from checkpoints that have it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers import TrainerCallback

MARKER = "zoft-complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def write_marker(folder: str | os.PathLike, step: int) -> None:
    folder = Path(folder)
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"global_step": step}))
    os.replace(tmp, folder / MARKER)


def checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every checkpoint-N folder, oldest first."""
    run_dir = Path(run_dir)
    found = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            m = _CHECKPOINT.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child, (child / MARKER).is_file()))
    return sorted(found)


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    complete = [folder for _, folder, ok in checkpoints(run_dir) if ok]
    return complete[-1] if complete else None


class CompleteCheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once HF Trainer has finished writing it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_marker(folder, state.global_step)
        return control
