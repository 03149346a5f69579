"""The trajectory of a zeroth-order run: one line per optimizer step, kilobytes for a whole run.

Because every z derives from (run seed, step, direction, parameter name), the scalars
``(step, lr, weight decay, per-direction coefficient)`` are all that is needed to rebuild the
fine-tuned weights from the base model (:func:`replay_updates`). With the torch z generator that is
exact on the same device type and dtype (replay refuses another device type: ``rng_device`` in the
header); with the philox generator (``z_generator`` in the header) on any device, bit for bit for
Rademacher z and to a few ulp per z for Gaussian z between the CUDA kernels and the CPU reference. The
rounding bits of half-precision weights come from the same kind of generator as z, so they follow the
same rule. The first line is a header describing the run; each later line is one step.
The header records how each trained parameter's updates were rounded (``rounding``); a run whose
offloaded blocks were stored in bf16/fp16 (ZO2's AMP mode) also records that under ``storage``, and
replay rounds the same parameters with the same seeds in each update.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from zoft.errors import ZoftError
from zoft.zo.lowprec import ROUNDINGS, STORAGE_DTYPES
from zoft.zo.perturb import ZOParameters

FORMAT_VERSION = 1


class TrajectoryWriter:
    """Append-only JSON-lines log, flushed after every step so a killed run keeps its steps.

    Args:
        path: the ``trajectory.jsonl`` file.
        header: run description, written when the file is new.
        resume_step: when resuming from a checkpoint taken after ``resume_step`` steps, records of
            later steps (written after that checkpoint by the interrupted run) are dropped.
    """

    def __init__(self, path: str | os.PathLike, header: dict, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if self.path.exists() and resume_step is not None:
            head, records = read_trajectory(self.path)
            kept = [r for r in records if r["step"] < resume_step]
            self._rewrite(head, kept)
        else:
            self._rewrite({"zoft_trajectory": FORMAT_VERSION, **header}, [])
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def _rewrite(self, header: dict, records: Iterable[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(header) + "\n")
            for r in records:
                fh.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_trajectory(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise ZoftError(f"{path}: no trajectory file (the run was not zeroth-order, or output.save_trajectory was off)")
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (json.JSONDecodeError, IndexError) as e:
        raise ZoftError(f"{path}: not a zoft trajectory ({e})") from None
    if header.get("zoft_trajectory") != FORMAT_VERSION:
        raise ZoftError(f"{path}: trajectory format {header.get('zoft_trajectory')!r} is not {FORMAT_VERSION}")
    return header, records


def storage_rounding(header: dict) -> tuple[torch.dtype, str, list[str]] | None:
    """``(storage dtype, rounding, names of the rounded parameters)`` of a low-precision-storage run, or None.

    Raises:
        ZoftError: a storage dtype or rounding this version cannot reproduce.
    """
    storage = header.get("storage")
    if storage is None:
        return None
    dtype, rounding = STORAGE_DTYPES.get(storage.get("dtype")), storage.get("rounding")
    if dtype is None or rounding not in ROUNDINGS:
        raise ZoftError(
            f"trajectory: storage dtype {storage.get('dtype')!r} with rounding {rounding!r} cannot be replayed by "
            f"this zoft version (it reproduces {'/'.join(STORAGE_DTYPES)} with {'/'.join(ROUNDINGS)})"
        )
    return dtype, rounding, list(storage.get("rounded", []))


def check_replay_device(header: dict, zo: ZOParameters) -> None:
    """Refuse to replay a run whose z (and rounding bits) this device would draw differently.

    torch.Generator's numbers differ between CPU and CUDA; the philox stream does not.

    Raises:
        ZoftError: one line naming the run's device and generator and what to use.
    """
    run_device = header.get("rng_device", "cpu")
    here = zo.device.type
    if recorded_z_generator(header) == "torch" and run_device != here:
        raise ZoftError(
            f"trajectory: the run drew z and rounding bits with torch.Generator on {run_device}, whose numbers differ "
            f"on {here}, so replay here would rebuild other weights; replay on a {run_device} machine, or train with "
            "method.z_generator: philox (the same numbers on every device)"
        )


def rounding_of(zo: ZOParameters) -> dict[str, list[str]]:
    """How each rounded parameter's updates are rounded: ``name -> [dtype, "stochastic" | "nearest"]``."""
    return {n: [str(d).removeprefix("torch."), mode] for n, (d, mode) in sorted(zo.rounding.items())}


def replay_updates(zo: ZOParameters, header: dict, records: Iterable[dict]) -> int:
    """Apply the logged updates to freshly loaded parameters; returns the number of steps applied.

    With a ``storage`` header (ZO2 with bf16/fp16 storage) the rounded parameters start rounded to
    nearest, as the offloader stored them, and each update rounds them as the run did.

    Raises:
        ZoftError: other trained parameters, another device for a torch-generator run, or another rounding
            of the updates than the run's (e.g. another model.dtype or method.master_weights).
    """
    expected = header.get("trained", {})
    actual = {n: list(p.shape) for n, p in zo.params.items()}
    if expected and {n: s for n, (s, _) in expected.items()} != actual:
        raise ZoftError(
            "the rebuilt model's trained parameters differ from the run's (names or shapes); "
            "replay needs the same model, adapter and zoft version as the run"
        )
    check_replay_device(header, zo)
    storage = storage_rounding(header)
    if storage is not None:
        dtype, rounding, names = storage
        unknown = [n for n in names if n not in zo.params]
        if unknown:
            raise ZoftError(f"trajectory: rounded parameter {unknown[0]!r} is not trained in the rebuilt model")
        bad = [n for n in names if zo.value(n).dtype != torch.float32]
        if bad:
            raise ZoftError(f"trajectory: {bad[0]!r} must be float32 to replay {dtype} storage (set model.dtype: float32)")
        with torch.no_grad():
            for n in names:  # the offloader stored them rounded to nearest
                zo.params[n].data.copy_(zo.params[n].data.to(dtype))
                zo.round_to_storage(n, dtype, rounding)
    if "rounding" in header and header["rounding"] != rounding_of(zo):
        ours = rounding_of(zo)
        name = next(n for n in sorted(set(header["rounding"]) | set(ours)) if header["rounding"].get(n) != ours.get(n))
        raise ZoftError(
            f"trajectory: the run rounded the updates of {name!r} as {header['rounding'].get(name, 'fp32 (none)')}, "
            f"this replay would use {rounding_of(zo).get(name, 'fp32 (none)')}; replay with the run's recipe "
            "(model.dtype, method.master_weights)"
        )
    n = 0
    for record in records:
        coefficients = [(int(k), float(c)) for k, c in record["coefficients"]]
        zo.apply_update(record["step"], coefficients, float(record["lr"]), float(record["weight_decay"]))
        n += 1
    return n


def recorded_z_generator(header: dict) -> str:
    """The z generator a trajectory was written with; logs without the field predate philox: torch."""
    return header.get("z_generator", "torch")


def trajectory_header(zo: ZOParameters, **extra) -> dict:
    return {
        "run_seed": zo.run_seed,
        "distribution": zo.distribution,
        "z_generator": zo.z_generator,
        "master_weights": sorted(zo.masters),
        "rounding": rounding_of(zo),
        # Where z and the rounding bits are drawn: the compute device (with offload, not where blocks are stored).
        "rng_device": zo.device.type,
        "trained": {n: [list(p.shape), str(p.dtype)] for n, p in zo.params.items()},
        **extra,
    }
