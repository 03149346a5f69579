"""zoft's own training metrics, added to HF's training logs so ``report_to`` (TensorBoard, W&B) records them.

Every training log (the dicts with ``loss`` that HF writes every ``logging_steps``) gets:

- ``tokens_per_second``: non-padding training tokens (``attention_mask`` ones, else ``input_ids``
  entries) of the batches trained since the previous log, divided by the wall time since then. Time
  spent in evaluation and checkpoint saving is not counted; data loading is. A zeroth-order step's
  batch counts once, however many forward passes it takes.
- ``peak_memory_mb``: the memory high-water mark so far, in MiB: ``torch.cuda.max_memory_allocated``
  on CUDA, the process's peak resident set size (``VmHWM``) on CPU. zoft never resets these counters
  (scripts and benchmarks read them too); reset them yourself before ``train()``
  (``torch.cuda.reset_peak_memory_stats()``, or ``echo 5 > /proc/self/clear_refs``) to see the training peak.

Privacy (``dp_epsilon``) and zeroth-order (``zo_projected_grad``, ``zo_loss_plus``, ``zo_loss_minus``)
values are added by the parts that own them (:mod:`zoft.privacy.trainer_dp`, :class:`zoft.trainer.ZoftTrainer`).
:class:`ZoftMetricsCallback` serves :class:`zoft.trainer.ZoftTrainer` and :class:`zoft.callback.ZoftCallback`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping

import torch
from transformers import TrainerCallback

from zoft.errors import ZoftError

__all__ = ["ZoftMetricsCallback", "count_tokens", "peak_memory_mb", "report_to_problem"]


def count_tokens(batch) -> int:
    """Non-padding tokens of a collated batch (``attention_mask`` ones, else ``input_ids`` entries).

    A mapping of batches (Addax's ``{"zo": ..., "fo": ...}``) is summed; ``None`` counts 0.
    """
    if batch is None or not isinstance(batch, Mapping):
        return 0
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask):
        return int(mask.sum())
    ids = batch.get("input_ids")
    if torch.is_tensor(ids):
        return int(ids.numel())
    return sum(count_tokens(v) for v in batch.values() if isinstance(v, Mapping))


def _cpu_peak_kib() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """The memory high-water mark in MiB: CUDA allocations on a CUDA device, the process's peak RSS otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _cpu_peak_kib() / 1024


class ZoftMetricsCallback(TrainerCallback):
    """Measures training throughput and memory, and adds them to training logs with :meth:`add_to`.

    The owner counts each training batch with :meth:`count_tokens` (``ZoftTrainer.training_step``, or a
    forward pre-hook from :meth:`attach_token_counter`) and calls :meth:`add_to` on each log before HF's
    reporters see it. The callback events only keep the clock: a window starts at train begin and after
    every training log, evaluation and save.

    Args:
        clock: seconds, monotonic (default ``time.perf_counter``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.device: torch.device | None = None
        self._window_tokens = 0
        self._window_start: float | None = None
        self._hook = None

    # -- counting ---------------------------------------------------------------------------------

    def count_tokens(self, batch) -> None:
        self._window_tokens += count_tokens(batch)

    def attach_token_counter(self, model: torch.nn.Module) -> None:
        """Count the tokens of every training forward of ``model`` (training mode, gradients on)."""
        self.detach_token_counter()

        def hook(module, args, kwargs):
            if not (module.training and torch.is_grad_enabled()):
                return
            if kwargs.get("input_ids") is not None or kwargs.get("attention_mask") is not None:
                self.count_tokens(kwargs)  # HF's Trainer calls model(**batch)
            elif args and torch.is_tensor(args[0]):
                self._window_tokens += int(args[0].numel())

        self._hook = model.register_forward_pre_hook(hook, with_kwargs=True)

    def detach_token_counter(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- the clock --------------------------------------------------------------------------------

    def _restart(self) -> None:
        self._window_tokens = 0
        self._window_start = self.clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.device = args.device
        self._restart()

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation runs between a log and the next training step: it is not training time.
        self._window_start = self.clock()

    def on_save(self, args, state, control, **kwargs):
        self._window_start = self.clock()

    # -- logs -------------------------------------------------------------------------------------

    def add_to(self, logs: dict) -> None:
        """Add ``tokens_per_second`` and ``peak_memory_mb`` to a training log (one with ``loss``)."""
        if "loss" not in logs or self._window_start is None:
            return
        seconds = self.clock() - self._window_start
        if seconds > 0:
            logs["tokens_per_second"] = self._window_tokens / seconds
        logs["peak_memory_mb"] = peak_memory_mb(self.device)
        self._restart()


# TrainingArguments.report_to names whose package is optional -> (module to import, pip name).
_REPORTERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}


def report_to_problem(report_to) -> str | None:
    """One line when ``report_to`` names a logger whose package is missing (HF would raise a traceback)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in _REPORTERS:
            continue
        modules, pip_name = _REPORTERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            return f"train.report_to '{name}': the {pip_name} package is not installed; pip install {pip_name}, or drop it"
    return None


def check_report_to(report_to) -> None:
    """Raise :class:`ZoftError` with :func:`report_to_problem`'s line, if any."""
    problem = report_to_problem(report_to)
    if problem:
        raise ZoftError(problem)
