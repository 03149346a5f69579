"""LoRA-Pro: adjust the gradients of LoRA's A and B so that the low-rank update they produce is the
best approximation of the full fine-tuning gradient, then take an AdamW step.

Paper: "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (Wang, Liang, He, Wang, Tan, 2024),
https://arxiv.org/abs/2407.18242. With ``W = W0 + s B A``, a step on (A, B) moves W by
``-lr * s (B gA + gB A)`` (the "equivalent gradient"). Plain LoRA uses ``gA = s B^T G``,
``gB = s G A^T``; LoRA-Pro picks the (gA, gB) minimizing ``|| s (B gA + gB A) - G ||_F`` and, among
those, the one closest to LoRA's own gradients (an r x r Sylvester equation). Only the LoRA
gradients are needed (``B^T G = gA / s``, ``G A^T = gB / s``), so the full gradient G is never formed.
What it saves: most of LoRA's gap to full fine-tuning at LoRA's memory (efficient mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from zoft.errors import ZoftError

Mode = Literal["efficient", "full"]


def _psd_eigh(gram: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD r x r matrix, and its pseudo-inverse eigenvalues."""
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0.0)
    cutoff = rcond * evals.max().clamp_min(torch.finfo(evals.dtype).tiny)
    inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(torch.finfo(evals.dtype).tiny), 0.0)
    return evals, evecs, inv


def _projected_gradients(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float, rcond: float
):
    """The least-squares part (X = 0) and what the Sylvester step needs; all fp32, no m x m / n x n."""
    inv_s2 = 1.0 / (scaling * scaling)
    evals_b, vecs_b, inv_b = _psd_eigh(B.T @ B, rcond)  # B^T B = Vb diag(evals_b) Vb^T
    evals_a, vecs_a, inv_a = _psd_eigh(A @ A.T, rcond)
    btb_pinv = (vecs_b * inv_b) @ vecs_b.T
    aat_pinv = (vecs_a * inv_a) @ vecs_a.T
    # gA* = (1/s^2) (B^T B)^+ gA: the A-part of the least-squares solution.
    proj_A = inv_s2 * (btb_pinv @ grad_A)
    # gB* = (1/s^2) (I - B (B^T B)^+ B^T) gB (A A^T)^+, with the projector applied as B @ (r x r).
    proj_B = inv_s2 * ((grad_B - B @ (btb_pinv @ (B.T @ grad_B))) @ aat_pinv)
    return proj_A, proj_B, (evals_b, vecs_b), (evals_a, vecs_a)


def _solve_sylvester_psd(eig_b, eig_a, rhs: torch.Tensor, rcond: float) -> torch.Tensor:
    """Solve ``(B^T B) X + X (A A^T) = rhs`` from the eigendecompositions of the two Gram matrices.

    In the eigenbases the equation is diagonal: ``(lambda_i + mu_j) Y_ij = (Vb^T rhs Va)_ij``. Both Gram
    matrices are PSD, so the sums are >= 0; entries whose sum vanishes (B and A both rank-deficient
    along them) get 0, the minimum-norm choice.
    """
    evals_b, vecs_b = eig_b
    evals_a, vecs_a = eig_a
    denom = evals_b[:, None] + evals_a[None, :]
    cutoff = rcond * denom.max().clamp_min(torch.finfo(denom.dtype).tiny)
    rotated = vecs_b.T @ rhs @ vecs_a
    y = torch.where(denom > cutoff, rotated / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0)
    return vecs_b @ y @ vecs_a.T


@torch.no_grad()
def lora_pro_gradients(
    A: torch.Tensor,
    B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    scaling: float,
    *,
    rcond: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's optimal gradients for one adapter (paper Theorems 2.1 and 2.2).

    Among all (gA, gB) minimizing ``|| s (B gA + gB A) - G ||_F``, where G is the full gradient behind
    ``grad_A = s B^T G`` and ``grad_B = s G A^T``, returns the pair closest to (grad_A, grad_B):
    ``gA = (1/s^2) (B^T B)^-1 grad_A + X A`` and
    ``gB = (1/s^2) (I - B (B^T B)^-1 B^T) grad_B (A A^T)^-1 - B X``, with X solving the Sylvester
    equation ``B^T B X + X A A^T = -(1/s^2) (B^T B)^-1 grad_A A^T``. Inverses are pseudo-inverses, so
    B = 0 (LoRA's first step) gives ``gA = 0`` and ``gB = (1/s^2) grad_B (A A^T)^-1``, the exact optimum.
    Computed in fp32 with r x r, r x n and m x r matrices only.

    Args:
        A: lora_A weight, shape (r, n).
        B: lora_B weight, shape (m, r).
        grad_A: LoRA's gradient of A, shape (r, n).
        grad_B: LoRA's gradient of B, shape (m, r).
        scaling: The adapter's scaling s (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA).
        rcond: Eigenvalues of B^T B and A A^T below ``rcond * largest`` count as zero.

    Returns:
        (new_grad_A, new_grad_B), in the dtype of grad_A and grad_B.
    """
    out_dtype_a, out_dtype_b = grad_A.dtype, grad_B.dtype
    A, B, grad_A, grad_B = (t.float() for t in (A, B, grad_A, grad_B))
    proj_A, proj_B, eig_b, eig_a = _projected_gradients(A, B, grad_A, grad_B, scaling, rcond)
    x = _solve_sylvester_psd(eig_b, eig_a, -(proj_A @ A.T), rcond)
    new_A = proj_A + x @ A
    new_B = proj_B - B @ x
    return new_A.to(out_dtype_a), new_B.to(out_dtype_b)


def equivalent_gradient(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float
):
    """``s (B gA + gB A)``: the full-weight direction a step on (A, B) takes (an m x n matrix)."""
    return scaling * (B.float() @ grad_A.float() + grad_B.float() @ A.float())


@dataclass
class _Pair:
    name: str  # the LoRA layer's module name
    A: nn.Parameter
    B: nn.Parameter
    layer: nn.Module
    adapter: str

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])


@torch.no_grad()
def correct_lora_gradients(pairs: list[_Pair], *, rcond: float = 1e-6) -> None:
    """Replace each pair's ``.grad`` (in place) by LoRA-Pro's gradients: the efficient mode's correction.

    Any optimizer stepped afterwards sees LoRA-Pro's gradients; AdamW (:class:`LoraProAdamW`) is the
    paper's. Pairs whose A or B has no gradient are left alone.

    Args:
        pairs: from :func:`find_lora_pairs`.
        rcond: relative cutoff of the pseudo-inverses (see :func:`lora_pro_gradients`).
    """
    for pair in pairs:
        if pair.A.grad is None or pair.B.grad is None:
            continue
        new_a, new_b = lora_pro_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling, rcond=rcond)
        pair.A.grad.copy_(new_a)
        pair.B.grad.copy_(new_b)


class LoraProAdamW(torch.optim.AdamW):
    """AdamW whose step first replaces each LoRA pair's gradients by LoRA-Pro's (see the module docstring).

    Built by :func:`create_lora_pro_optimizer`; other trainable parameters (biases, modules_to_save)
    get plain AdamW. The HF Trainer's schedulers, gradient clipping (applied to the raw gradients)
    and checkpointing work unchanged: the full-mode moments live in ``self.state`` of each lora_A.
    """

    def __init__(self, params, pairs: list[_Pair], *, mode: Mode, rcond: float, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        self.lora_pro_pairs = pairs
        self.lora_pro_mode = mode
        self.lora_pro_rcond = rcond

    def _group_of(self) -> dict[int, dict]:
        return {id(p): group for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.lora_pro_mode == "efficient":
            correct_lora_gradients(self.lora_pro_pairs, rcond=self.lora_pro_rcond)
            super().step()
            return loss
        # Full mode: the pairs are updated here and hidden from AdamW, which steps everything else.
        groups = self._group_of()
        stashed = []
        for pair in self.lora_pro_pairs:
            if pair.A.grad is None or pair.B.grad is None:
                continue
            self._full_step(pair, groups[id(pair.A)])
            stashed.append((pair, pair.A.grad, pair.B.grad))
            pair.A.grad, pair.B.grad = None, None
        try:
            super().step()
        finally:
            for pair, grad_a, grad_b in stashed:
                pair.A.grad, pair.B.grad = grad_a, grad_b
        return loss

    def _full_step(self, pair: _Pair, group: dict) -> None:
        """Adam on the equivalent gradient (m x n moments), then the update projected back onto (A, B)."""
        A, B, s = pair.A, pair.B, pair.scaling
        rcond = self.lora_pro_rcond
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        A32, B32 = A.float(), B.float()
        proj_A, proj_B, _, _ = _projected_gradients(A32, B32, A.grad.float(), B.grad.float(), s, rcond)
        # X drops out of s (B gA + gB A), so the least-squares part gives the equivalent gradient.
        equiv = equivalent_gradient(A32, B32, proj_A, proj_B, s)
        del proj_A, proj_B
        state = self.state[A]
        if "lora_pro_step" not in state:
            state["lora_pro_step"] = 0
            state["lora_pro_exp_avg"] = torch.zeros_like(equiv)
            state["lora_pro_exp_avg_sq"] = torch.zeros_like(equiv)
        state["lora_pro_step"] += 1
        t = state["lora_pro_step"]
        exp_avg, exp_avg_sq = state["lora_pro_exp_avg"], state["lora_pro_exp_avg_sq"]
        exp_avg.lerp_(equiv, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(equiv, equiv, value=1 - beta2)
        del equiv
        denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps)
        direction = (exp_avg / (1 - beta1**t)).div_(denom)  # the full-FT Adam direction D (m x n)
        del denom
        # LoRA gradients of D, then LoRA-Pro's best (gA, gB) for it: s (B gA + gB A) ~ D.
        new_a, new_b = lora_pro_gradients(
            A32, B32, s * (B32.T @ direction), s * (direction @ A32.T), s, rcond=rcond
        )
        del direction
        if wd:
            # Decay the product B A by (1 - lr wd); the base weights stay untouched so the adapter
            # still applies to the original model (the authors' code also decays W0).
            shrink = math.sqrt(max(0.0, 1.0 - lr * wd))
            A.mul_(shrink)
            B.mul_(shrink)
        A.add_(new_a.to(A.dtype), alpha=-lr)
        B.add_(new_b.to(B.dtype), alpha=-lr)


def find_lora_pairs(model: nn.Module) -> list[_Pair]:
    """The trainable (lora_A, lora_B) pairs of a peft LoRA model, by module and adapter name.

    Raises:
        ZoftError: If the model has a non-LoRA peft adapter, no trainable LoRA layer, or LoRA layers
            LoRA-Pro cannot correct (DoRA, embedding or convolution LoRA).
    """
    from peft.tuners.lora.layer import LoraLayer

    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        for adapter, config in peft_config.items():
            kind = str(getattr(config, "peft_type", "")).split(".")[-1]
            if kind != "LORA":
                raise ZoftError(
                    f"LoRA-Pro corrects LoRA adapters; adapter {adapter!r} is {kind}; use a peft LoraConfig"
                )
    pairs: list[_Pair] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for emb_a in getattr(module, "lora_embedding_A", {}).values():
            if emb_a.requires_grad:
                raise ZoftError(
                    f"LoRA-Pro supports LoRA on linear layers; {name!r} is an embedding LoRA layer; "
                    "remove it from target_modules"
                )
        for adapter, lora_a in module.lora_A.items():
            lora_b = module.lora_B[adapter]
            if not (lora_a.weight.requires_grad and lora_b.weight.requires_grad):
                continue
            if module.use_dora.get(adapter, False):
                raise ZoftError(f"LoRA-Pro does not support DoRA ({name!r}); set use_dora=False")
            if lora_a.weight.ndim != 2 or lora_b.weight.ndim != 2:
                raise ZoftError(
                    f"LoRA-Pro supports LoRA on linear layers; {name!r} is a {type(module).__name__} "
                    "LoRA layer; remove it from target_modules"
                )
            pairs.append(_Pair(name, lora_a.weight, lora_b.weight, module, adapter))
    if not pairs:
        raise ZoftError(
            "LoRA-Pro needs a model with trainable LoRA layers; wrap it with peft.get_peft_model(model, LoraConfig(...))"
        )
    return pairs


def create_lora_pro_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    mode: Mode = "efficient",
    *,
    rcond: float = 1e-6,
) -> torch.optim.Optimizer:
    """Create a LoRA-Pro optimizer for a peft LoRA model (peft ``create_<name>_optimizer`` style).

    Use it in a plain HF Trainer as ``Trainer(..., optimizers=(create_lora_pro_optimizer(model, lr), None))``.

    Modes:

    - ``"efficient"`` (default): each step replaces the LoRA gradients by LoRA-Pro's, then runs AdamW
      on A and B. Memory: AdamW's (two moments per adapter parameter) plus r x r, r x n and m x r
      temporaries per layer during the step.
    - ``"full"``: the paper's Algorithm 1. Adam moments are kept for the equivalent gradient of each
      adapted weight (m x n, fp32) and the Adam direction is projected back onto A and B. Memory: two
      fp32 m x n matrices per adapted layer, i.e. the optimizer state of full fine-tuning of those
      weights (8 bytes per base weight entry), plus about two m x n temporaries during the step.

    Args:
        model: A peft model with LoRA adapters (or any module holding peft LoRA layers).
        lr: Learning rate.
        weight_decay: Decoupled weight decay for matrices (not for biases or norms). In full mode it
            decays the adapter product ``B A`` only, not the base weights.
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        mode: ``"efficient"`` or ``"full"``.
        rcond: Relative cutoff for the pseudo-inverses of ``B^T B`` and ``A A^T`` (B = 0 at LoRA's start).

    Returns:
        A ``torch.optim.Optimizer`` (an AdamW subclass).

    Raises:
        ZoftError: Non-LoRA peft methods, no trainable LoRA layer, unsupported LoRA layers, bad mode.
    """
    if mode not in ("efficient", "full"):
        raise ZoftError(f"LoRA-Pro: unknown mode {mode!r}; use 'efficient' or 'full'")
    if not lr > 0:
        raise ZoftError(f"LoRA-Pro: lr must be positive, got {lr!r}")
    pairs = find_lora_pairs(model)
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return LoraProAdamW(
        groups, pairs, mode=mode, rcond=rcond, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )


__all__ = [
    "LoraProAdamW",
    "correct_lora_gradients",
    "create_lora_pro_optimizer",
    "equivalent_gradient",
    "find_lora_pairs",
    "lora_pro_gradients",
]
