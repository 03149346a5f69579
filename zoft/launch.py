"""Running as one rank of a multi-process launch (``torchrun``, ``accelerate launch``, ``deepspeed``).

zoft never starts processes itself: a launcher starts N copies of ``python -m zoft train r.yaml``
and each copy is one rank (``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment). This
module says whether we run under a launcher, which rank is the main one, and fits a recipe to
the launch: a zeroth-order recipe across several processes trains with DistZO2 (the recipe's
``distributed`` section, data parallel by default); a first-order one with HF's DDP or DeepSpeed.
Only the main rank prints and writes run files; the output folder is prepared once, by rank 0,
and its outcome (or refusal) shared with every rank, so the ranks cannot race on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

from zoft.errors import ZoftError

T = TypeVar("T")

def world_size(environ: Mapping[str, str] | None = None) -> int:
    """Processes in this launch (1 without a launcher); read before any process group exists."""
    env = os.environ if environ is None else environ
    try:
        return max(int(env.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this launch on this machine (``LOCAL_WORLD_SIZE``, set by torchrun and accelerate)."""
    env = os.environ if environ is None else environ
    try:
        return max(int(env.get("LOCAL_WORLD_SIZE", world_size(env))), 1)
    except ValueError:
        return world_size(env)


def rank() -> int:
    """This process's global rank: from the process group once it exists, else the launcher's RANK."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """The rank that prints and writes run files (global rank 0)."""
    return rank() == 0


def main_print(*args, **kwargs) -> None:
    """``print`` on the main rank only (a 2-process run says everything once)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class SharedError(ZoftError):
    """An error every rank raises with the same message (rank 0's, shared; or a check of the launch
    itself), so only rank 0 reports it."""


def on_main_then_share(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    Without an initialized process group (one process) ``fn`` simply runs. If ``fn`` raises on
    rank 0, every rank raises a :class:`SharedError` with the same message, so no rank waits
    forever for a rank that stopped.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - shared below, then re-raised as is on rank 0
            failure = e
            box[0] = ("error", str(e) if isinstance(e, ZoftError) else f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if isinstance(failure, ZoftError):
        raise SharedError(str(failure)) from failure
    if failure is not None:  # a bug, not a user error: its traceback on rank 0
        raise failure
    if kind == "error":
        raise SharedError(value)
    return value


def cpu_ddp_kwargs(cuda_available: bool, environ: Mapping[str, str] | None = None) -> dict:
    """TrainingArguments needed for HF to run as one rank of a CPU launch.

    Without CUDA, HF's Trainer under torchrun (or ``accelerate launch --multi_gpu``) otherwise runs
    each rank alone on the whole data set (parallel mode NOT_PARALLEL); ``use_cpu`` makes it join
    the launch's gloo process group and wrap the model in DDP, as it does on GPUs.
    """
    if cuda_available or world_size(environ) <= 1:
        return {}
    return {"use_cpu": True}


def join_process_group(args) -> None:
    """Join the launch's process group (a no-op for one process): HF sets it up on first use of
    ``args.device``. On CPU with DeepSpeed, DeepSpeed's communication layer is attached to that gloo
    group too; on GPUs accelerate does that itself.
    """
    _ = args.device
    if args.deepspeed and args.use_cpu and world_size() > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def single_process_env(environ: dict | None = None) -> None:
    """Give a process started without a launcher the environment of rank 0 of 1.

    DeepSpeed always joins a process group and, without a launcher's variables, looks for MPI;
    HF documents setting these for a single process (e.g. one GPU with ZeRO offload).
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return
    import socket

    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        env.setdefault(key, value)


def launch_command(recipe_path: str, nproc: int) -> str:
    return f"torchrun --nproc_per_node {nproc} -m zoft train {recipe_path}"


def check_process_count(recipe, recipe_path: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a recipe that needs several processes when zoft runs as one, saying how to launch it.

    Raises:
        ZoftError: the ``distributed`` section asks for more processes than were launched (1).
    """
    d = recipe.distributed
    if d is None or world_size(environ) > 1:
        return
    needed = d.perturbation_parallel * (d.data_parallel or 1)
    if needed > 1:
        raise ZoftError(
            f"distributed: this recipe runs on {needed} processes (perturbation_parallel {d.perturbation_parallel}"
            f" x data_parallel {d.data_parallel or 1}) and zoft was started as one; start it with a launcher: "
            f"{launch_command(recipe_path, needed)} (or accelerate launch --num_processes {needed} -m zoft train ...)"
        )


def fit_recipe_to_launch(recipe, environ: Mapping[str, str] | None = None):
    """The recipe this launch runs: unchanged for one process or a first-order method.

    A zeroth-order recipe launched on several processes without a ``distributed`` section gets
    one with the defaults (DistZO2 data parallelism): plain DDP would let each rank apply its own
    update to its own weights. Recipes that cannot run on several processes are refused.

    Raises:
        SharedError: the recipe's method or sections run in one process only, or an ``accelerate launch``
            with FSDP meets a method that needs whole tensors (:mod:`zoft.fsdp`).
    """
    from zoft.config import DistributedSection, validate_recipe
    from zoft.fsdp import ACCELERATE_SOURCE, accelerate_fsdp_launch, recipe_problem

    if accelerate_fsdp_launch(environ):  # HF's Trainer would wrap the model in FSDP, recipe or not
        problem = recipe_problem(recipe, ACCELERATE_SOURCE)
        if problem:
            raise SharedError(problem)
    n = world_size(environ)
    if n <= 1:
        return recipe
    if recipe.privacy is not None:
        raise SharedError(
            f"privacy: a private run is one process in this version (the accountant assumes one noise draw per "
            f"step), but {n} were launched; run it without a launcher"
        )
    if not recipe.method.is_zeroth_order or recipe.distributed is not None:
        return recipe
    if recipe.method.name != "mezo":
        raise SharedError(
            f"method '{recipe.method.name}' runs in one process in this version, but {n} were launched; "
            "run it without a launcher, or use method mezo (DistZO2) to train on several processes"
        )
    data = recipe.model_dump(mode="json", exclude_unset=True)
    data["distributed"] = DistributedSection().model_dump(mode="json")
    fitted = validate_recipe(data, source="recipe")
    main_print(
        f"zoft: {n} processes: zeroth-order data parallelism (DistZO2: each rank a shard of the batch, only "
        "losses exchanged); add a distributed section to choose perturbation parallelism"
    )
    return fitted


def finish() -> None:
    """Leave the launch's process group cleanly once the run is saved.

    Gloo runs otherwise abort at interpreter exit now and then (status -6, after all work is done)
    while DDP's reducer is torn down; freeing it first and leaving together avoids that.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
