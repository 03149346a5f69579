"""LoRA-Pro: run Adam on the full-weight gradient that LoRA's factors can best express, then move A and B
so that their low-rank update best follows Adam's full-weight direction (the paper's Algorithm 1).

Paper: "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (Wang, Liang, He, Wang, Tan, 2024),
https://arxiv.org/abs/2407.18242; the authors' code: https://github.com/mrflogs/LoRA-Pro. With
``W = W0 + s B A``, a step on (A, B) moves W by ``-lr * s (B gA + gB A)`` (the "equivalent gradient").
LoRA-Pro picks the (gA, gB) minimizing ``|| s (B gA + gB A) - G ||_F`` and, among those, the one closest
to LoRA's own gradients (an r x r Sylvester equation); only LoRA's gradients are needed
(``B^T G = gA / s``, ``G A^T = gB / s``), so the full gradient G is never formed. Each step: the
equivalent gradient of the optimal pair, Adam's moments on it (m x n per adapted weight), Adam's
direction D, and the optimal pair for D applied to A and B with the learning rate.
What it saves: most of LoRA's gap to full fine-tuning while training LoRA's parameters; the cost is Adam's
state of full fine-tuning for the adapted weights (two fp32 m x n matrices each), not LoRA's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from zoft.errors import ZoftError

Mode = Literal["full"]
# The one line for the removed mode, in the recipe, the callback and the Python API alike.
EFFICIENT_REMOVED = (
    "'efficient' was removed: AdamW on LoRA-Pro's corrected A/B gradients trained worse than plain LoRA "
    "(docs/lora.md); use 'full', the paper's Adam on the equivalent gradient (the default)"
)


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


_STATE_KEYS = ("lora_pro_exp_avg", "lora_pro_exp_avg_sq")


@torch.no_grad()
def lora_pro_step(
    A: torch.Tensor,
    B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    scaling: float,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    rcond: float = 1e-6,
) -> None:
    """One LoRA-Pro step on one adapter (the paper's Algorithm 1): A and B are updated in place.

    1. ``g~ = s (B gA* + gB* A)`` with (gA*, gB*) LoRA-Pro's optimal gradients for LoRA's (grad_A, grad_B):
       the equivalent gradient, the best rank-constrained approximation of the full gradient;
    2. Adam on g~ with its moments in ``state`` (two fp32 m x n matrices, bias-corrected): direction D;
    3. LoRA's gradients of D (``s B^T D``, ``s D A^T``) replaced by LoRA-Pro's optimal pair (gA, gB) for D,
       so that ``s (B gA + gB A)`` best approximates D, as the authors' code does;
    4. ``A -= lr gA``, ``B -= lr gB``: the authors hand (gA, gB) to plain SGD (``optim="sgd"``, weight decay 0).

    ``weight_decay`` (zoft's addition; the authors use 0 and never decay W0) shrinks the adapter's product
    ``B A`` by ``1 - lr * weight_decay`` before the step, AdamW's decoupled decay of the update ``s B A``;
    the base weights stay untouched.

    Args:
        A: lora_A weight, shape (r, n); B: lora_B weight, shape (m, r).
        grad_A, grad_B: LoRA's gradients of A and B.
        scaling: The adapter's scaling s.
        state: This adapter's optimizer state (created on the first call): ``lora_pro_step`` (int) and the
            two moments, kept in fp32.
        lr: Learning rate. betas, eps: Adam's. weight_decay: decay of ``B A`` (see above).
        rcond: Relative cutoff of the pseudo-inverses (see :func:`lora_pro_gradients`).
    """
    beta1, beta2 = betas
    A32, B32 = A.float(), B.float()
    proj_A, proj_B, _, _ = _projected_gradients(A32, B32, grad_A.float(), grad_B.float(), scaling, rcond)
    # X drops out of s (B gA + gB A), so the least-squares part gives the equivalent gradient.
    equiv = equivalent_gradient(A32, B32, proj_A, proj_B, scaling)
    del proj_A, proj_B
    if "lora_pro_step" not in state:
        state["lora_pro_step"] = 0
        for key in _STATE_KEYS:
            state[key] = torch.zeros_like(equiv)
    for key in _STATE_KEYS:  # a checkpoint loaded by torch.optim casts state to the parameter's dtype
        if state[key].dtype != torch.float32:
            state[key] = state[key].float()
    state["lora_pro_step"] += 1
    t = state["lora_pro_step"]
    exp_avg, exp_avg_sq = state["lora_pro_exp_avg"], state["lora_pro_exp_avg_sq"]
    exp_avg.lerp_(equiv, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(equiv, equiv, value=1 - beta2)
    del equiv
    denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps)
    direction = (exp_avg / (1 - beta1**t)).div_(denom)  # the full-FT Adam direction D (m x n)
    del denom
    new_a, new_b = lora_pro_gradients(
        A32, B32, scaling * (B32.T @ direction), scaling * (direction @ A32.T), scaling, rcond=rcond
    )
    del direction
    if weight_decay:
        shrink = math.sqrt(max(0.0, 1.0 - lr * weight_decay))  # (shrink A) (shrink B) = (1 - lr wd) B A
        A.mul_(shrink)
        B.mul_(shrink)
    A.add_(new_a.to(A.dtype), alpha=-lr)
    B.add_(new_b.to(B.dtype), alpha=-lr)


class LoraProAdamW(torch.optim.AdamW):
    """LoRA-Pro for each LoRA pair (:func:`lora_pro_step`), AdamW for every other trainable parameter.

    Built by :func:`create_lora_pro_optimizer`. The HF Trainer's schedulers (the group's ``lr``), gradient
    clipping (applied to the raw gradients) and checkpointing work unchanged: each pair's moments live in
    ``self.state`` of its lora_A.
    """

    def __init__(self, params, pairs: list[_Pair], *, mode: Mode = "full", rcond: float, **adamw_kwargs):
        _check_mode(mode)
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
        # The pairs are updated here and hidden from AdamW, which steps everything else.
        groups = self._group_of()
        stashed = []
        for pair in self.lora_pro_pairs:
            if pair.A.grad is None or pair.B.grad is None:
                continue
            group = groups[id(pair.A)]
            lora_pro_step(
                pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling, self.state[pair.A],
                lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                rcond=self.lora_pro_rcond,
            )
            stashed.append((pair, pair.A.grad, pair.B.grad))
            pair.A.grad, pair.B.grad = None, None
        try:
            super().step()
        finally:
            for pair, grad_a, grad_b in stashed:
                pair.A.grad, pair.B.grad = grad_a, grad_b
        return loss


def _check_mode(mode: str) -> None:
    if mode == "efficient":
        raise ZoftError(f"LoRA-Pro: mode {EFFICIENT_REMOVED}")
    if mode != "full":
        raise ZoftError(f"LoRA-Pro: unknown mode {mode!r}; use 'full' (the paper's algorithm, the default)")


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
    mode: Mode = "full",
    *,
    rcond: float = 1e-6,
) -> torch.optim.Optimizer:
    """Create a LoRA-Pro optimizer for a peft LoRA model (peft ``create_<name>_optimizer`` style).

    Use it in a plain HF Trainer as ``Trainer(..., optimizers=(create_lora_pro_optimizer(model, lr), None))``.
    Each LoRA pair takes the paper's step (:func:`lora_pro_step`): Adam on the equivalent gradient, whose
    direction is mapped back onto A and B. Memory: two fp32 m x n moments per adapted m x n weight, the
    optimizer state of full fine-tuning of those weights (8 bytes per base weight entry), plus about two
    m x n temporaries during the step. Other trainable parameters (biases, modules_to_save) get AdamW.

    Args:
        model: A peft model with LoRA adapters (or any module holding peft LoRA layers).
        lr: Learning rate.
        weight_decay: Decoupled weight decay for matrices (not for biases or norms). On a LoRA pair it
            decays the adapter product ``B A``, never the base weights; the authors' code uses 0.
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        mode: ``"full"``, the paper's algorithm (the only mode; ``"efficient"`` was removed, see
            docs/lora.md).
        rcond: Relative cutoff for the pseudo-inverses of ``B^T B`` and ``A A^T`` (B = 0 at LoRA's start).

    Returns:
        A ``torch.optim.Optimizer`` (an AdamW subclass).

    Raises:
        ZoftError: Non-LoRA peft methods, no trainable LoRA layer, unsupported LoRA layers, bad mode.
    """
    _check_mode(mode)
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
    "EFFICIENT_REMOVED",
    "LoraProAdamW",
    "create_lora_pro_optimizer",
    "equivalent_gradient",
    "find_lora_pairs",
    "lora_pro_gradients",
    "lora_pro_step",
]
