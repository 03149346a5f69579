"""Triton kernels: per-sample norm, clip and accumulate of a linear layer's weight gradient (FlashDP).

Paper: "FlashDP: Private Training Large Language Models with Efficient DP-SGD" (2025),
https://arxiv.org/abs/2507.01154. Its reference is ``linear_grad_explicit`` in
``zoft.kernels.flashdp_reference``; ``clipped_linear_weight_grad_triton`` returns the same values.

Two launches per layer, and no per-sample gradient ever reaches global memory:
1. ``_sqnorm_kernel``: one program per (sample, d_out tile, d_in tile) forms that tile of the sample's
   gradient ``g_b^T x_b`` in registers and atomically adds its squared norm to ``norm2[b]``.
2. ``_clip_accumulate_kernel``: one program per (d_out tile, d_in tile) runs one GEMM over all B*T rows
   with each row of ``g`` scaled by its sample's clip factor ``min(1, C / (||G_b|| + 1e-6))`` computed
   in the kernel from ``norm2``, and adds the result into the existing gradient buffer.
The weight-gradient GEMM is done twice (norm pass, accumulate pass): that is the price of never
storing per-sample gradients. Products use IEEE fp32 (no TF32) so the norms behind the clip factors
are exact to fp32 rounding. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the variable
must be set before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoft.kernels.flashdp_reference import CLIP_EPS


@triton.jit
def _sqnorm_kernel(
    x_ptr, g_ptr, norm2_ptr,
    tokens, d_in, d_out,
    sxb, sxt, sxi, sgb, sgt, sgo,
    scale_sq,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        g_tile = tl.load(
            g_ptr + b * sgb + offs_t[None, :] * sgt + offs_o[:, None] * sgo,
            mask=(offs_t[None, :] < tokens) & (offs_o[:, None] < d_out),
            other=0.0,
        ).to(tl.float32)
        x_tile = tl.load(
            x_ptr + b * sxb + offs_t[:, None] * sxt + offs_i[None, :] * sxi,
            mask=(offs_t[:, None] < tokens) & (offs_i[None, :] < d_in),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(g_tile, x_tile, input_precision="ieee")
    tl.atomic_add(norm2_ptr + b, tl.sum(acc * acc) * scale_sq)


@triton.jit
def _clip_accumulate_kernel(
    x_ptr, g_ptr, norm2_ptr, out_ptr,
    rows, tokens, d_in, d_out,
    sxr, sxi, sgr, sgo, soo, soi,
    bound, scale,
    ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        row_ok = offs_r < rows
        norm = tl.sqrt(tl.load(norm2_ptr + offs_r // tokens, mask=row_ok, other=0.0))
        factor = tl.minimum(bound / (norm + CLIP_EPS), 1.0) * scale
        g_tile = tl.load(
            g_ptr + offs_r[None, :] * sgr + offs_o[:, None] * sgo,
            mask=row_ok[None, :] & (offs_o[:, None] < d_out),
            other=0.0,
        ).to(tl.float32)
        x_tile = tl.load(
            x_ptr + offs_r[:, None] * sxr + offs_i[None, :] * sxi,
            mask=row_ok[:, None] & (offs_i[None, :] < d_in),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(g_tile * factor[None, :], x_tile, input_precision="ieee")
    out_ptrs = out_ptr + offs_o[:, None] * soo + offs_i[None, :] * soi
    out_mask = (offs_o[:, None] < d_out) & (offs_i[None, :] < d_in)
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, acc, mask=out_mask)


def clipped_linear_weight_grad_triton(
    x: torch.Tensor,
    g: torch.Tensor,
    bound: float,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    block_t: int = 32,
    block_o: int = 32,
    block_i: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped summed per-sample weight gradient of a linear layer, fused in Triton.

    Args:
        x: layer input [B, ..., d_in] (batch first).
        g: gradient w.r.t. the layer output [B, ..., d_out].
        bound: clipping bound C of the weight.
        scale: multiplies every per-sample gradient (e.g. B when the loss is a batch mean).
        out: fp32 [d_out, d_in] buffer to add into (e.g. an fp32 ``.grad``); a new zero one if None.
        block_t, block_o, block_i: tile sizes (each >= 16, powers of two, as ``tl.dot`` requires).

    Returns:
        (``out`` holding the clipped sum added to its previous content, per-sample norms [B] fp32).
    """
    batch, d_in, d_out = x.shape[0], x.shape[-1], g.shape[-1]
    x3 = x.reshape(batch, -1, d_in).contiguous()
    g3 = g.reshape(batch, -1, d_out).contiguous()
    tokens = x3.shape[1]
    norm2 = torch.zeros(batch, dtype=torch.float32, device=x.device)
    grid = (batch, triton.cdiv(d_out, block_o), triton.cdiv(d_in, block_i))
    _sqnorm_kernel[grid](
        x3, g3, norm2, tokens, d_in, d_out,
        x3.stride(0), x3.stride(1), x3.stride(2), g3.stride(0), g3.stride(1), g3.stride(2),
        float(scale) ** 2,
        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_I=block_i,
    )  # fmt: skip
    accumulate = out is not None
    if out is None:
        out = torch.empty(d_out, d_in, dtype=torch.float32, device=x.device)
    x2, g2 = x3.reshape(-1, d_in), g3.reshape(-1, d_out)
    grid = (triton.cdiv(d_out, block_o), triton.cdiv(d_in, block_i))
    _clip_accumulate_kernel[grid](
        x2, g2, norm2, out, x2.shape[0], tokens, d_in, d_out,
        x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1), out.stride(0), out.stride(1),
        float(bound), float(scale),
        ACCUMULATE=accumulate, BLOCK_R=block_t, BLOCK_O=block_o, BLOCK_I=block_i,
    )  # fmt: skip
    return out, norm2.sqrt()
