"""Plain-torch per-sample clipped weight gradient of a linear layer (the reference for the Triton kernel).

For ``y = x W^T`` with per-sample inputs ``x_b`` [T, d_in] and output gradients ``g_b`` [T, d_out], the
per-sample weight gradient is ``G_b = s * g_b^T x_b`` (``s`` is the loss scale). These functions return
``sum_b min(1, C / (||G_b|| + 1e-6)) G_b`` and the per-sample norms ``||G_b||`` without ever holding all
``G_b`` at once: the explicit path forms them for a block of samples at a time (memory
``block * d_out * d_in``), the ghost path never forms them and takes the norm from Gram matrices
(``||G_b||^2 = <x_b x_b^T, g_b g_b^T>``, memory ``block * T^2``), then does one matmul with the
per-sample clip factors folded into ``g``. The ``1e-6`` in the clip factor is Opacus's convention.
"""

from __future__ import annotations

import torch

CLIP_EPS = 1e-6  # added to the norm in the clip factor, as Opacus does, so a zero gradient gives factor 1


def clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """``min(1, bound / (norm + 1e-6))`` per sample."""
    return (bound / (norms + CLIP_EPS)).clamp(max=1.0)


def _as_bti(t: torch.Tensor) -> torch.Tensor:
    # Every dimension between the batch and the feature one (tokens, heads...) is a "token" of the sample.
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _block_size(per_sample_elems: int, block_bytes: int) -> int:
    return max(1, block_bytes // max(1, 4 * per_sample_elems))


def linear_grad_explicit(
    x: torch.Tensor,
    g: torch.Tensor,
    bound: float,
    scale: float = 1.0,
    block_bytes: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped summed weight gradient by forming each sample's gradient, a block of samples at a time.

    Args:
        x: layer input, shape [B, ..., d_in] (batch first).
        g: gradient of the loss w.r.t. the layer output, shape [B, ..., d_out].
        bound: the clipping bound C of this parameter.
        scale: multiplies every per-sample gradient (e.g. B when the loss is a batch mean).
        block_bytes: fp32 bytes of per-sample gradients held at once.

    Returns:
        (clipped sum [d_out, d_in] in fp32, per-sample norms [B] in fp32).
    """
    x3, g3 = _as_bti(x).float(), _as_bti(g).float()
    batch, d_in, d_out = x3.shape[0], x3.shape[-1], g3.shape[-1]
    out = torch.zeros(d_out, d_in, dtype=torch.float32, device=x.device)
    norms = torch.empty(batch, dtype=torch.float32, device=x.device)
    step = _block_size(d_in * d_out, block_bytes)
    for start in range(0, batch, step):
        per_sample = torch.bmm(g3[start : start + step].transpose(1, 2), x3[start : start + step])
        if scale != 1.0:
            per_sample.mul_(scale)
        n = per_sample.flatten(1).norm(dim=1)
        norms[start : start + step] = n
        # tensordot sums the scaled per-sample gradients without a second [b, d_out, d_in] buffer.
        out += torch.tensordot(clip_factors(n, bound), per_sample, dims=1)
    return out, norms


def linear_sqnorms_ghost(
    x: torch.Tensor, g: torch.Tensor, scale: float = 1.0, block_bytes: int = 64 << 20
) -> torch.Tensor:
    """Per-sample squared norms of ``scale * g_b^T x_b`` from Gram matrices (ghost norm), in fp32."""
    x3, g3 = _as_bti(x).float(), _as_bti(g).float()
    batch, tokens = x3.shape[0], x3.shape[1]
    out = torch.empty(batch, dtype=torch.float32, device=x.device)
    step = _block_size(2 * tokens * tokens, block_bytes)
    for start in range(0, batch, step):
        xs, gs = x3[start : start + step], g3[start : start + step]
        gram_x = torch.bmm(xs, xs.transpose(1, 2))
        gram_g = torch.bmm(gs, gs.transpose(1, 2))
        out[start : start + step] = (gram_x * gram_g).sum(dim=(1, 2))
    return out.clamp_(min=0.0) * (scale * scale)


def linear_grad_ghost(
    x: torch.Tensor,
    g: torch.Tensor,
    bound: float,
    scale: float = 1.0,
    block_bytes: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`linear_grad_explicit`, with norms from the ghost-norm identity.

    Cheaper than the explicit path when ``T^2 < d_in * d_out`` (short sequences, wide layers).
    """
    x3, g3 = _as_bti(x).float(), _as_bti(g).float()
    norms = linear_sqnorms_ghost(x3, g3, scale, block_bytes).sqrt()
    factors = clip_factors(norms, bound) * scale
    scaled_g = g3 * factors[:, None, None]
    out = scaled_g.reshape(-1, g3.shape[-1]).t() @ x3.reshape(-1, x3.shape[-1])
    return out, norms


def bias_grad(g: torch.Tensor, bound: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped summed gradient of a bias (or a per-feature shift): per-sample grad ``scale * sum_t g_t``."""
    per_sample = _as_bti(g).float().sum(dim=1) * scale
    norms = per_sample.norm(dim=1)
    return clip_factors(norms, bound) @ per_sample, norms
