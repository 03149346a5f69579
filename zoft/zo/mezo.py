"""MeZO: zeroth-order SGD with in-place seeded perturbation, at inference memory.

Paper: "Fine-Tuning Language Models with Just Forward Passes" (Malladi et al., NeurIPS 2023),
https://arxiv.org/abs/2305.17333. Each step runs two forwards at theta +- eps z, forms the
projected gradient g = (L+ - L-) / 2eps and updates theta -= lr (g z + wd theta) by regenerating z
from its seed. Saves gradients, optimizer state and stored activations.

The update lives in :class:`MeZOOptimizer`, an ordinary ``torch.optim.Optimizer`` placed in HF
Trainer's optimizer slot, so HF's lr schedulers, logging, checkpointing and gradient-accumulation
bookkeeping keep working unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zoft.zo.estimate import DirectionEstimate
from zoft.zo.perturb import ZOParameters
from zoft.zo.qzo import clip_projected_grad


@dataclass
class MeZOConfig:
    """Settings of a zeroth-order run (the recipe's ``method`` section, as plain values)."""

    eps: float = 1e-3
    n_directions: int = 1
    distribution: str = "gaussian"
    master_weights: str = "auto"
    z_generator: str = "auto"  # torch | philox | auto (philox when computing on CUDA); zoft.zo.perturb
    seed: int | None = None  # default: TrainingArguments.seed
    clip_projected_grad: float | None = None  # QZO: bound on |projected gradient| (zoft.zo.qzo)
    paired_forward: bool = False  # both perturbed forwards in one forward of a doubled batch (zoft.zo.paired)


class MeZOOptimizer(torch.optim.Optimizer):
    """ZO-SGD: applies ``theta -= lr * (mean_k g_k z_k + wd * theta)`` at ``step()``.

    The trainer calls :meth:`record` once per micro-batch and direction (weight 1/accumulation
    steps, so micro-batches that share a seed average their projected gradients); ``step()``
    applies the pending update with the lr the scheduler set, then calls ``on_update`` (the
    trajectory log) with the exact numbers used.
    """

    def __init__(
        self,
        zo: ZOParameters,
        lr: float,
        weight_decay: float = 0.0,
        n_directions: int = 1,
        on_update: Callable[[dict], None] | None = None,
        clip: float | None = None,
    ) -> None:
        super().__init__(
            [{"params": list(zo.params.values())}], {"lr": lr, "weight_decay": weight_decay}
        )
        self.zo = zo
        self.n_directions = n_directions
        self.on_update = on_update
        self.clip = clip  # QZO: each recorded projected gradient is clipped to [-clip, clip]
        self.n_clipped = 0  # how many recorded projected gradients were clipped (logged by the trainer)
        self._step_clipped = 0
        self._pending_step: int | None = None
        self._pending: dict[int, float] = {}
        self._losses: dict[int, list[float]] = {}

    def record(self, step: int, estimate: DirectionEstimate, weight: float = 1.0) -> None:
        if self._pending_step is not None and step != self._pending_step:
            raise RuntimeError(f"MeZO: a step-{self._pending_step} update is still pending at step {step}")
        self._pending_step = step
        k = estimate.direction
        g = estimate.projected_grad
        if self.clip is not None:
            g, clipped = clip_projected_grad(g, self.clip)
            self.n_clipped += clipped
            self._step_clipped += clipped
        self._pending[k] = self._pending.get(k, 0.0) + weight * g
        lp, lm = self._losses.setdefault(k, [0.0, 0.0])
        self._losses[k] = [lp + weight * estimate.loss_plus, lm + weight * estimate.loss_minus]

    @property
    def has_pending(self) -> bool:
        return self._pending_step is not None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer API
        if self._pending_step is None:
            return None
        group = self.param_groups[0]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        coefficients = [(k, g / self.n_directions) for k, g in sorted(self._pending.items())]
        self._commit_update(self._pending_step, coefficients, lr, wd)
        if self.on_update is not None:
            self.on_update(
                {
                    "step": self._pending_step,
                    "lr": lr,
                    "weight_decay": wd,
                    "coefficients": coefficients,
                    "loss_plus": [self._losses[k][0] for k, _ in coefficients],
                    "loss_minus": [self._losses[k][1] for k, _ in coefficients],
                    **({"clipped": self._step_clipped} if self.clip is not None else {}),
                }
            )
        self._pending_step, self._pending, self._losses = None, {}, {}
        self._step_clipped = 0
        return None

    def _commit_update(self, step: int, coefficients: list[tuple[int, float]], lr: float, wd: float) -> None:
        """Apply the step's update to the weights (ZO2's optimizer defers it to each block's next forward)."""
        self.zo.apply_update(step, coefficients, lr, wd)

    def flush(self) -> None:
        """Apply any deferred update now (before evaluation and save). MeZO applies at step()."""
        # A pending record here means step() was not reached (e.g. evaluation mid-accumulation);
        # such partial accumulations are not applied, matching first-order gradient accumulation.

    def zero_grad(self, set_to_none: bool = True) -> None:  # no gradients exist in ZO training
        return None

    def state_dict(self):
        state = super().state_dict()
        state["zo_masters"] = self.zo.state_dict()
        state["zo_z_generator"] = self.zo.z_generator
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("zo_masters", {})
        # Checkpoints from before the philox generator existed drew z with torch.Generator.
        self.zo.adopt_z_generator(state_dict.pop("zo_z_generator", "torch"))
        super().load_state_dict(state_dict)
        self.zo.load_state_dict(masters)
