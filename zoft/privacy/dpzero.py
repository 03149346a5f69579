"""DPZero: differential privacy for zeroth-order fine-tuning by clipping and noising the SPSA scalar.

Paper: "DPZero: Private Fine-Tuning of Language Models without Backpropagation" (Zhang et al., 2023),
https://arxiv.org/abs/2310.09639. A ZO step releases one number per direction, the projected gradient
``(l(+eps) - l(-eps)) / (2 eps)``. DPZero computes it per sample, clips each to [-C, C], adds Gaussian
noise to the sum and divides by the batch size. The noise std is ``sigma C`` when neighbouring data sets
differ by adding or removing one example (Poisson sampling) and ``2 sigma C`` when they differ by
replacing one (fixed-size batches: one scalar can go from -C to C), as the paper's reference does. The direction z is data-independent
(seeded), so the update ``g * z`` is post-processing. Cost: one clamp and one normal draw per step; the
epsilon comes from the same accountant as DP-SGD (``zoft.privacy.accounting``) with q, sigma, steps.
With k directions per step (n-SPSA) each sample's k scalars have L2 sensitivity ``C sqrt(k)``: account
with noise multiplier ``sigma / sqrt(k)``.
"""

from __future__ import annotations

import torch

from zoft.errors import ZoftError
from zoft.privacy.accounting import sensitivity_factor

__all__ = ["dpzero_projected_grad"]


def dpzero_projected_grad(
    loss_plus: torch.Tensor,
    loss_minus: torch.Tensor,
    eps: float,
    clip: float,
    sigma: float,
    generator: torch.Generator | None = None,
    expected_batch_size: float | None = None,
    adjacency: str = "add_remove",
) -> torch.Tensor:
    """The private projected-gradient scalar of one SPSA direction.

    Args:
        loss_plus: per-sample losses at ``theta + eps z``, shape [B].
        loss_minus: per-sample losses at ``theta - eps z``, shape [B].
        eps: the perturbation scale.
        clip: C, the bound on each sample's scalar.
        sigma: the noise multiplier (noise std ``sigma * C`` on the sum, ``2 sigma C`` for replace-one).
        generator: RNG for the noise (CPU or the losses' device); the global RNG if None.
        expected_batch_size: divide by this (``q * N`` under Poisson sampling); B if None.
        adjacency: ``"add_remove"`` (Poisson sampling, sensitivity C) or ``"replace_one"`` (fixed-size
            batches, sensitivity 2C).

    Returns:
        A 0-dim fp32 tensor ``(sum_i clamp(g_i, -C, C) + N(0, (k sigma C)^2)) / batch``, k = 1 or 2.

    Raises:
        ZoftError: shapes differ or are not [B], or eps/clip/sigma out of range.
    """
    if loss_plus.dim() != 1 or loss_plus.shape != loss_minus.shape:
        raise ZoftError(
            f"DPZero needs per-sample losses of shape [B] at +eps and -eps, got {tuple(loss_plus.shape)} and "
            f"{tuple(loss_minus.shape)}; compute the loss with reduction='none' and average over tokens"
        )
    if not eps > 0 or not clip > 0 or sigma < 0:
        raise ZoftError(f"DPZero needs eps > 0, clip > 0, sigma >= 0; got eps={eps}, clip={clip}, sigma={sigma}")
    factor = sensitivity_factor(adjacency)
    per_sample = (loss_plus.detach().float() - loss_minus.detach().float()) / (2.0 * eps)
    total = per_sample.clamp(-clip, clip).sum()
    if sigma > 0:
        device = generator.device if generator is not None else total.device
        noise = torch.randn((), generator=generator, device=device) * (factor * sigma * clip)
        total = total + noise.to(total.device)
    batch = float(expected_batch_size) if expected_batch_size is not None else float(loss_plus.numel())
    if not batch > 0:
        raise ZoftError("DPZero: the batch size must be > 0 (pass expected_batch_size for empty Poisson batches)")
    return total / batch
