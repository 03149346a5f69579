"""Two-point SPSA estimates of the projected gradient over a loss closure.

For a direction z and scale eps, ``g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)`` estimates
the directional derivative z^T grad L; ``g * z`` is an unbiased estimate of the gradient of the
eps-smoothed loss (Spall, 1992; MeZO, Malladi et al. 2023, arXiv 2305.17333). n-SPSA averages n
independent directions. :func:`paired_spsa` computes the same estimate from one forward of a doubled
batch (:mod:`zoft.zo.paired`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zoft.zo.paired import paired_perturbation
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


@torch.no_grad()
def paired_spsa(
    zo: ZOParameters,
    pair_loss_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    step: int,
    eps: float,
    n_directions: int = 1,
    seq_len: int | None = None,
) -> list[DirectionEstimate]:
    """:func:`spsa` from ``n_directions`` forwards of the doubled batch ``[x; x]`` instead of ``2 * n_directions``.

    Per direction one forward runs inside :func:`zoft.zo.paired.paired_perturbation`: its first half sees
    ``theta + eps z``, its second ``theta - eps z``, with z sampled once for both. With offloading each
    block is then resident once per direction, not twice.

    Args:
        zo: the trained parameters and their seeded perturbation.
        pair_loss_fn: runs the model once on the doubled batch and returns ``(L+, L-)``, the loss of each
            half computed exactly as the loss of the undoubled batch would be.
        batch_size: rows of the undoubled batch as the model sees it (``input_ids.shape[0]``).
        step, eps, n_directions: as for :func:`spsa`.
        seq_len: tokens per row of the undoubled batch (``input_ids.shape[1]``), so that modules that see
            the batch's tokens flattened (OPT's MLP) are split too.
    """
    estimates = []
    for k in range(n_directions):
        with paired_perturbation(zo, step, k, eps, batch_size, seq_len):
            loss_plus, loss_minus = (float(v) for v in pair_loss_fn())
        estimates.append(DirectionEstimate(k, (loss_plus - loss_minus) / (2.0 * eps), loss_plus, loss_minus))
    return estimates
