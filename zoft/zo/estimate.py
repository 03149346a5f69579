"""Two-point SPSA estimates of the projected gradient over a loss closure.

For a direction z and scale eps, ``g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)`` estimates
the directional derivative z^T grad L; ``g * z`` is an unbiased estimate of the gradient of the
eps-smoothed loss (Spall, 1992; MeZO, Malladi et al. 2023, arXiv 2305.17333). n-SPSA averages n
independent directions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zoft.zo.perturb import ZOParameters


@dataclass
class DirectionEstimate:
    direction: int
    projected_grad: float
    loss_plus: float
    loss_minus: float


@torch.no_grad()
def spsa(
    zo: ZOParameters,
    loss_fn: Callable[[], torch.Tensor],
    step: int,
    eps: float,
    n_directions: int = 1,
) -> list[DirectionEstimate]:
    """Run ``2 * n_directions`` perturbed forwards and return one estimate per direction.

    Args:
        zo: the trained parameters and their seeded perturbation.
        loss_fn: computes the scalar loss of the current batch with the model as it is.
        step: the optimizer step; with the direction index it fixes every z.
        eps: perturbation scale.
        n_directions: number of independent directions (n-SPSA).
    """
    estimates = []
    for k in range(n_directions):
        with zo.perturbed(step, k, +eps):
            loss_plus = float(loss_fn())
        with zo.perturbed(step, k, -eps):
            loss_minus = float(loss_fn())
        # Python floats (float64) so the logged value is exactly what the update uses.
        estimates.append(DirectionEstimate(k, (loss_plus - loss_minus) / (2.0 * eps), loss_plus, loss_minus))
    return estimates
