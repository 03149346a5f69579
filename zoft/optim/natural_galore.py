"""Natural GaLore: GaLore's low-rank gradient projection plus an inverse-empirical-Fisher step, for full fine-tuning.

Paper: "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning", Arijit Das,
2024, https://arxiv.org/abs/2410.16029 (GaLore itself: https://arxiv.org/abs/2403.03507).
Each targeted weight's gradient is projected onto its top-r singular subspace (refreshed by SVD every T
steps); the projected gradient g is preconditioned with the inverse of the damped empirical Fisher of the
last s projected gradients, applied through the Woodbury identity (an s x s solve instead of a d x d one);
Adam runs on the result with its two moments in the projected space, and the update is mapped back.
What it saves: Adam's moments for an m x n weight shrink from 2mn to 2rn (r << m) numbers, plus the r x n
basis. The Fisher window costs s more projected-gradient copies (s r n numbers) and an s x s Gram matrix:
with s = 20 that is ten times the moments, so the window, not the moments, dominates this optimizer's
state unless s is small (see scripts/bench_natural_galore.py for measured bytes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from zoft.errors import ZoftError
from zoft.optim.galore_projector import (
    apply_change_of_basis,
    change_of_basis,
    compute_projection,
    project,
    project_back,
    projection_side,
)

# GaLore's published defaults (fine-tuning settings of the GaLore paper, also galore-torch's README).
DEFAULT_RANK = 128  # r: rows/cols kept by the projection; moments shrink by about min(m, n) / r
DEFAULT_UPDATE_PROJ_GAP = 200  # T: steps between SVD refreshes of the subspace (one SVD per weight per T)
DEFAULT_SCALE = 0.25  # alpha: the low-rank update is multiplied by this when mapped back
# Natural GaLore's additions.
DEFAULT_HISTORY = 20  # s: projected gradients kept for the empirical Fisher (0 turns the natural step off)
DEFAULT_DAMPING_MODE = "absolute"  # the paper's fixed lambda; "relative" scales it by the window's gradients
DEFAULT_DAMPING = 1e-3  # lambda, absolute (the paper and its code): F = lambda I + G G^T
DEFAULT_RELATIVE_DAMPING = 1.0  # delta for damping_mode "relative": lambda = delta * mean_i ||g_i||^2
DAMPING_MODES = ("absolute", "relative")


def inverse_fisher_vector_product(g: torch.Tensor, history: torch.Tensor, damping: float) -> torch.Tensor:
    """Return ``(damping * I + G G^T)^{-1} g`` through the Woodbury identity, G = ``history`` as columns.

    With G of shape d x s (s stored gradients of dimension d),
    ``(lam I + G G^T)^{-1} g = (g - G (lam I + G^T G)^{-1} G^T g) / lam``, which needs only the s x s
    Gram matrix G^T G and one s x s solve instead of a d x d inverse.

    Args:
        g: The vector to precondition, any shape with d elements.
        history: s stored gradients, shape (s, *g.shape) or (s, d).
        damping: lam > 0, the absolute Tikhonov damping.

    Returns:
        A tensor shaped like ``g`` (float32 math, returned in ``g``'s dtype).
    """
    s = history.shape[0]
    flat_hist = history.reshape(s, -1).float()
    flat_g = g.reshape(-1).float()
    gram = flat_hist @ flat_hist.t()
    b = flat_hist @ flat_g
    y = torch.linalg.solve(damping * torch.eye(s, dtype=gram.dtype, device=gram.device) + gram, b)
    out = (flat_g - flat_hist.t() @ y) / damping
    return out.view(g.shape).to(g.dtype)


class NaturalGaLore(torch.optim.Optimizer):
    """AdamW with GaLore projection and Natural GaLore's inverse-Fisher step on groups that set ``rank``.

    Param groups with ``rank`` (an int) are projected; 2-D parameters in them get, per step t:

    1. every ``update_proj_gap`` steps (and on the first), a new basis from the SVD of the gradient;
    2. ``g = project(grad)`` (r x n or m x r, the smaller side is kept as galore-torch does);
    3. if ``history`` > 0: ``g`` joins a window of the last s projected gradients G (it is one of them), and is
       replaced through the Woodbury identity (an s x s solve) by
       ``(lam I + G G^T)^{-1} g`` with ``lam = damping`` (``damping_mode="absolute"``, the paper's, default
       1e-3), or by ``lam (lam I + G G^T)^{-1} g`` with ``lam = damping * mean_i ||g_i||^2``
       (``damping_mode="relative"``, default damping 1.0);
    4. Adam on ``g`` with moments in the projected space, bias correction folded into the step size;
    5. ``p -= step_size * scale * project_back(m / (sqrt(v) + eps))``, then decoupled weight decay
       ``p -= lr * weight_decay * p`` (galore-torch's update order).

    The two damping modes. ``absolute`` is the paper's and its code's: a fixed lam (1e-3) next to G G^T, so the
    window's directions are damped by how large the gradients are against lam; with gradients much larger
    than sqrt(lam) they are almost removed. Adam then runs on ``F^{-1} g`` as the paper does (Adam's
    normalisation makes the scale 1/lam of unseen directions irrelevant, up to its eps). ``relative`` (zoft's
    earlier default) ties lam to the window's mean squared gradient norm, so ``damping`` means the same for
    every layer and loss scale, and multiplies the result by lam to keep it on the gradient's scale; at
    damping 1 it whitens much less than the paper (docs/natural_galore.md measures both). Groups without
    ``rank`` (and 1-D parameters in any group) are plain AdamW with the same update formula.

    Subspace refresh policy (``reproject_moments``, default True): when the basis changes from P_old to
    P_new, the first moment and the gradient window are re-expressed in the new basis with the r x r matrix
    R = P_new^T P_old (the part outside the new subspace is dropped), the second moment with R * R
    element-wise (the variance of R m for independent coordinates; exact when the new basis is a signed
    permutation of the old one, e.g. the same subspace with reordered singular values), and the Gram matrix
    is recomputed. Bias-correction counters keep running. ``reproject_moments=False`` keeps the moments'
    coordinates unchanged, which is what galore-torch does (they then refer to the new basis's vectors);
    the gradient window is re-projected in both cases, since a Fisher mixing two bases would be meaningless.

    The state holds tensors and Python ints only (``torch.load(weights_only=True)`` loads a checkpoint) and
    a resumed optimizer continues bit-for-bit.

    Args:
        params: Parameters or param groups (see :func:`natural_galore_param_groups`).
        lr: Learning rate.
        betas: Adam's (beta1, beta2).
        eps: Added to sqrt(v) in the denominator.
        weight_decay: Decoupled weight decay (applied after the update, as galore-torch does).
        update_proj_gap: T, steps between SVD refreshes, for groups with ``rank``.
        scale: GaLore's alpha, multiplies the update mapped back to full size.
        history: s, projected gradients kept for the empirical Fisher; 0 gives exactly GaLore-AdamW.
        damping: lam > 0 for ``damping_mode="absolute"`` (default 1e-3, the paper's), or delta > 0 relative to
            the window's mean squared gradient norm for ``"relative"``. Larger is closer to plain GaLore;
            smaller whitens harder (and amplifies noise).
        damping_mode: ``"absolute"`` (the paper's) or ``"relative"`` (see above).
        reproject_moments: The subspace refresh policy above.

    Raises:
        ZoftError: For out-of-range hyperparameters.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP,
        scale: float = DEFAULT_SCALE,
        history: int = DEFAULT_HISTORY,
        damping: float = DEFAULT_DAMPING,
        reproject_moments: bool = True,
        damping_mode: str = DEFAULT_DAMPING_MODE,
    ):
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "history": history,
            "damping": damping,
            "damping_mode": damping_mode,
            "reproject_moments": reproject_moments,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise ZoftError("NaturalGaLore does not support sparse gradients; use dense embeddings")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        projected = group.get("rank") is not None and p.dim() == 2
        if projected:
            side = projection_side(p.shape)
            if "basis" not in state or state["step"] % group["update_proj_gap"] == 0:
                new_basis = compute_projection(grad, group["rank"])
                if "basis" in state:
                    self._refresh(state, state["basis"], new_basis, side, group)
                state["basis"] = new_basis
            grad = project(grad, state["basis"])
            if group["history"] > 0:
                grad = self._natural_gradient(state, grad, group)

        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        update = exp_avg / denom
        if projected:
            update = project_back(update, state["basis"], projection_side(p.shape), group["scale"])
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _refresh(state: dict, old: torch.Tensor, new: torch.Tensor, side: str, group: dict) -> None:
        r = change_of_basis(old, new, side)
        if group["reproject_moments"] and "exp_avg" in state:
            state["exp_avg"] = apply_change_of_basis(state["exp_avg"], r, side).contiguous()
            state["exp_avg_sq"] = apply_change_of_basis(state["exp_avg_sq"], r * r, side).contiguous()
        if "grad_history" in state:
            hist = apply_change_of_basis(state["grad_history"], r, side).contiguous()
            state["grad_history"] = hist
            flat = hist.reshape(hist.shape[0], -1).float()
            state["gram"] = flat @ flat.t()

    @staticmethod
    def _natural_gradient(state: dict, g: torch.Tensor, group: dict) -> torch.Tensor:
        s = group["history"]
        if "grad_history" not in state:
            state["grad_history"] = torch.zeros((s, *g.shape), dtype=g.dtype, device=g.device)
            state["gram"] = torch.zeros((s, s), dtype=torch.float32, device=g.device)
            state["history_count"] = 0
            state["history_pos"] = 0
        hist, gram = state["grad_history"], state["gram"]
        flat_hist = hist.view(s, -1)
        pos = state["history_pos"]
        # The Gram matrix is kept up to date one row per step (s dot products) instead of recomputed (s^2).
        hist[pos].copy_(g)
        dots = flat_hist.float() @ flat_hist[pos].float()
        gram[pos, :] = dots
        gram[:, pos] = dots
        count = min(state["history_count"] + 1, s)
        state["history_count"] = count
        state["history_pos"] = (pos + 1) % s
        # Slots fill from 0 upwards and wrap only once full, so the live ones are always [0, count).
        active_gram = gram[:count, :count]
        relative = group.get("damping_mode", "relative") == "relative"  # state from before the key: relative
        if relative:
            mean_sq_norm = float(active_gram.diagonal().sum()) / count
            if mean_sq_norm == 0.0:
                return g
            lam = group["damping"] * mean_sq_norm
        else:
            lam = group["damping"]
        # g is column `pos` of G, so (lam I + G G^T)^{-1} g = G (lam I + G^T G)^{-1} e_pos (push-through
        # identity): an s x s solve and one combination of the window, without the cancellation of Woodbury's
        # (g - G y) / lam, which loses every digit in float32 once lam is far below |g|^2 (the paper's 1e-3).
        # The s x s solve runs in float64: lam + G^T G is as ill-conditioned as lam is small.
        eye = torch.eye(count, dtype=torch.float64, device=gram.device)
        z = torch.linalg.solve(lam * eye + active_gram.double(), eye[:, pos])
        if relative:
            z = z * lam  # zoft's relative mode keeps the result on the gradient's scale
        out = flat_hist[:count].float().t() @ z.float()
        return out.view(g.shape).to(g.dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, keeping the Gram matrices in float32.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype; the Gram matrix is
        accumulated in float32 whatever the parameter dtype, so it is restored as saved.
        """
        grams = {k: v["gram"] for k, v in state_dict["state"].items() if "gram" in v}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, gram in grams.items():
            p = params[index]
            self.state[p]["gram"] = gram.to(device=p.device, dtype=torch.float32).clone()


def _check_group(group: dict[str, Any]) -> None:
    if group["lr"] < 0:
        raise ZoftError(f"NaturalGaLore lr must be >= 0, got {group['lr']}")
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ZoftError(f"NaturalGaLore betas must be in [0, 1), got {group['betas']}")
    if group["eps"] < 0:
        raise ZoftError(f"NaturalGaLore eps must be >= 0, got {group['eps']}")
    if group.get("rank") is None:
        return
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ZoftError(f"NaturalGaLore rank must be a positive int, got {rank!r}")
    if not isinstance(group["update_proj_gap"], int) or group["update_proj_gap"] < 1:
        raise ZoftError(f"NaturalGaLore update_proj_gap must be an int >= 1, got {group['update_proj_gap']!r}")
    if not isinstance(group["history"], int) or group["history"] < 0:
        raise ZoftError(f"NaturalGaLore history must be an int >= 0 (0 = plain GaLore), got {group['history']!r}")
    if group["history"] > 0 and not group["damping"] > 0:
        raise ZoftError(f"NaturalGaLore damping must be > 0 when history > 0, got {group['damping']!r}")
    if group.get("damping_mode", DEFAULT_DAMPING_MODE) not in DAMPING_MODES:
        raise ZoftError(
            f"NaturalGaLore damping_mode must be 'absolute' (the paper's fixed lambda) or 'relative', "
            f"got {group['damping_mode']!r}"
        )
    if not group["scale"] > 0:
        raise ZoftError(f"NaturalGaLore scale must be > 0, got {group['scale']!r}")


# ----------------------------------------------------------------------------------------------------------
# Choosing what to project (mirrors transformers' `optim_target_modules`)
# ----------------------------------------------------------------------------------------------------------


def _module_matches(target_modules: str | Sequence[str], name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(t == name or t in name or re.fullmatch(t, name) is not None for t in target_modules)


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a linear layer: an ``nn.Linear``, or a wrapper holding one as ``original`` (WTA-CRS)."""
    if isinstance(module, nn.Linear):
        return module.weight
    original = getattr(module, "original", None)
    if isinstance(original, nn.Linear) and getattr(module, "weight", None) is original.weight:
        return module.weight
    return None


def _is_all_linear(target_modules: str | Sequence[str]) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"


def select_target_parameters(model: nn.Module, target_modules: str | Sequence[str] = "all-linear") -> list[str]:
    """Names of the ``nn.Linear`` weights that GaLore projects.

    Matching follows transformers' ``optim_target_modules``: a string is a regex matched against the full
    module name (``re.fullmatch``); a list matches a module whose name equals, contains, or fully matches
    (as a regex) one of its entries. ``"all-linear"`` takes every ``nn.Linear`` except the output layer
    (``model.get_output_embeddings()``, or a module named ``lm_head``) and anything sharing its weight with
    an embedding, as peft's "all-linear" does: the vocabulary projection is usually tied to the input
    embedding and is not a low-rank-friendly matrix. Only linear layers are projected: ``nn.Linear`` and
    wrappers that hold one as ``original`` and share its weight (zoft's WTA-CRS layers); a matched module of
    another type is left to AdamW.

    Args:
        model: The model.
        target_modules: ``"all-linear"``, a regex, or a list of names / substrings / regexes.

    Returns:
        Parameter names (``module_name + ".weight"``) in model order.

    Raises:
        ZoftError: If nothing matches (the message lists the model's linear layer names).
    """
    if isinstance(target_modules, str):
        patterns: str | list[str] = target_modules
    elif isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules):
        patterns = list(target_modules)
    else:
        raise ZoftError(
            f"target_modules must be 'all-linear', a regex string or a list of strings, got {target_modules!r}"
        )
    all_linear = _is_all_linear(patterns)
    excluded: set[int] = set()
    if all_linear:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None and getattr(output, "weight", None) is not None:
            excluded.add(id(output.weight))
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                excluded.add(id(module.weight))
    names: list[str] = []
    seen: set[int] = set()
    linear_names: list[str] = []
    for module_name, module in model.named_modules():
        weight = _linear_weight(module)
        if weight is None:
            continue
        linear_names.append(module_name)
        if not weight.requires_grad or id(weight) in seen:
            continue
        if all_linear:
            if id(weight) in excluded or module_name.split(".")[-1] == "lm_head":
                continue
        elif not _module_matches(patterns, module_name):
            continue
        seen.add(id(weight))
        names.append(module_name + ".weight")
    if not names:
        short = sorted({n.split(".")[-1] for n in linear_names})
        raise ZoftError(
            f"target_modules={target_modules!r} matched no trainable nn.Linear layer; this model's linear layers "
            f"are named {', '.join(short) or '(none)'} (e.g. {linear_names[0] if linear_names else 'none'}): "
            "use some of these names, a regex over full module names, or 'all-linear'"
        )
    return names


def natural_galore_param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    weight_decay: float = 0.0,
    rank: int = DEFAULT_RANK,
    update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP,
    scale: float = DEFAULT_SCALE,
    history: int = DEFAULT_HISTORY,
    damping: float = DEFAULT_DAMPING,
    reproject_moments: bool = True,
    damping_mode: str = DEFAULT_DAMPING_MODE,
) -> list[dict[str, Any]]:
    """Param groups for :class:`NaturalGaLore`: targeted linear weights projected, the rest plain AdamW.

    Weight decay goes to parameters with 2 or more dimensions (matrices, embeddings), not to biases and
    norm weights, as HF Trainer's default grouping does.

    Args:
        model: The model; only parameters with ``requires_grad`` are included.
        target_modules: See :func:`select_target_parameters`.
        weight_decay: Decoupled weight decay for matrices.
        rank, update_proj_gap, scale, history, damping, reproject_moments, damping_mode: See
            :class:`NaturalGaLore`.

    Returns:
        Up to three groups: projected weights (with ``rank`` set), other matrices, and 1-D parameters.

    Raises:
        ZoftError: If nothing matches ``target_modules``.
    """
    targets = set(select_target_parameters(model, target_modules))
    projected, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in targets:
            projected.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups: list[dict[str, Any]] = [
        {
            "params": projected,
            "weight_decay": weight_decay,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "history": history,
            "damping": damping,
            "damping_mode": damping_mode,
            "reproject_moments": reproject_moments,
        }
    ]
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ----------------------------------------------------------------------------------------------------------
# Layer-wise variant: each parameter steps in its post-accumulate-grad hook, so full gradients are never held
# ----------------------------------------------------------------------------------------------------------


def check_layerwise_compatible(gradient_accumulation_steps: int, world_size: int) -> None:
    """Refuse the settings the layer-wise variant cannot honour.

    The layer-wise optimizer steps each parameter as soon as its gradient is complete and then frees the
    gradient, so there is nothing left to accumulate across micro-batches, and DDP's all-reduce (which runs
    on bucketed gradients after the hooks) would average gradients that were already applied.

    Args:
        gradient_accumulation_steps: The run's gradient accumulation.
        world_size: Number of data-parallel processes.

    Raises:
        ZoftError: If ``gradient_accumulation_steps > 1`` or ``world_size > 1``.
    """
    if gradient_accumulation_steps > 1:
        raise ZoftError(
            f"layer-wise Natural GaLore steps each layer during backward and cannot accumulate gradients "
            f"(gradient_accumulation_steps={gradient_accumulation_steps}); set gradient_accumulation_steps: 1 "
            "or use layerwise: false"
        )
    if world_size > 1:
        raise ZoftError(
            f"layer-wise Natural GaLore does not support data parallelism (world_size={world_size}); "
            "run on one process or use layerwise: false"
        )


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class NaturalGaLoreLayerwise(torch.optim.Optimizer):
    """The object for HF's optimizer slot when each parameter is stepped inside its gradient hook.

    It registers a ``register_post_accumulate_grad_hook`` on every parameter of ``optimizer_dict``: when the
    parameter's gradient is complete the hook runs that parameter's own :class:`NaturalGaLore` and sets the
    gradient to None, so at most one parameter's full gradient exists at a time. ``step()`` and
    ``zero_grad()`` do no work; ``step()`` checks that no parameter was stepped twice since the previous
    call (which is what gradient accumulation would do) and raises ZoftError if so.

    Learning-rate schedules: the object has one param group (on a placeholder tensor) whose ``lr`` any
    scheduler may drive; each hook scales the per-parameter optimizers' initial learning rates by
    ``current lr / initial lr`` before stepping. This works whether or not HF/accelerate wraps the object
    (transformers' own ``LayerWiseDummyOptimizer`` relies on ``get_scheduler`` seeing the unwrapped dummy,
    which it does not after ``accelerator.prepare``). ``state_dict()`` gathers the per-parameter
    optimizers' states (tensors and ints only).

    Args:
        optimizer_dict: Parameter -> the one-parameter optimizer that updates it.
        lr: The initial learning rate (the reference for the schedule's ratio).
        **kwargs: Ignored (HF passes extra arguments to dummy optimizers).

    Raises:
        ZoftError: Under data parallelism (world size > 1).
    """

    def __init__(self, optimizer_dict: dict[torch.Tensor, torch.optim.Optimizer], lr: float = 1e-3, **kwargs):
        check_layerwise_compatible(1, _world_size())
        super().__init__([torch.zeros(1)], {"lr": lr})
        self.optimizer_dict = optimizer_dict
        self._initial_lr = lr
        self._initial_lrs = {id(p): [g["lr"] for g in opt.param_groups] for p, opt in optimizer_dict.items()}
        self._steps_since_boundary: dict[int, int] = {}
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook) for p in optimizer_dict if p.requires_grad
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks free each gradient after using it."""

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        opt = self.optimizer_dict[p]
        current = self.param_groups[0]["lr"]
        ratio = current / self._initial_lr if self._initial_lr else 0.0
        for group, initial in zip(opt.param_groups, self._initial_lrs[id(p)]):
            # The same initial lr (the usual case) takes the scheduled value as is: bit-identical to a scheduler
            # driving one grouped optimizer, where initial * (current / initial) could be off by a rounding.
            group["lr"] = current if initial == self._initial_lr else initial * ratio
        opt.step()
        p.grad = None
        self._steps_since_boundary[id(p)] = self._steps_since_boundary.get(id(p), 0) + 1

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """Mark a step boundary (the updates already happened in the hooks).

        Raises:
            ZoftError: If a parameter was updated more than once since the last call (gradient accumulation).
        """
        repeated = max(self._steps_since_boundary.values(), default=0)
        self._steps_since_boundary.clear()
        if repeated > 1:
            check_layerwise_compatible(repeated, 1)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the parameters then no longer update during backward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """The per-parameter optimizers' state dicts (``optimizer_dict`` order) and the scheduled lr."""
        return {
            "layerwise": [opt.state_dict() for opt in self.optimizer_dict.values()],
            "lr": self.param_groups[0]["lr"],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` produced (same model, same parameter order)."""
        if "layerwise" not in state_dict:
            return  # a dummy optimizer's own (empty) state, e.g. from accelerate's device placement
        opts = list(self.optimizer_dict.values())
        if len(opts) != len(state_dict["layerwise"]):
            raise ZoftError(
                f"layer-wise optimizer state has {len(state_dict['layerwise'])} parameters but this model has "
                f"{len(opts)}; resume with the same model and target_modules"
            )
        for opt, sd in zip(opts, state_dict["layerwise"]):
            opt.load_state_dict(sd)
        self.param_groups[0]["lr"] = state_dict["lr"]


def _adam_kwargs(lr: float, betas: tuple[float, float], eps: float) -> dict[str, Any]:
    return {"lr": lr, "betas": tuple(betas), "eps": eps}


def create_natural_galore_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    rank: int = DEFAULT_RANK,
    update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP,
    scale: float = DEFAULT_SCALE,
    history: int = DEFAULT_HISTORY,
    damping: float = DEFAULT_DAMPING,
    reproject_moments: bool = True,
    layerwise: bool = False,
    damping_mode: str = DEFAULT_DAMPING_MODE,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    gradient_accumulation_steps: int = 1,
) -> torch.optim.Optimizer:
    """Build Natural GaLore for ``model``, ready for ``Trainer(optimizers=(opt, None))``.

    Args:
        model: The model to fine-tune (all trainable parameters are optimized).
        lr: Learning rate.
        weight_decay: Decoupled weight decay for matrices (not biases / norms).
        target_modules: Linear layers to project: ``"all-linear"``, a regex, or a list (see
            :func:`select_target_parameters`).
        rank, update_proj_gap, scale, history, damping, reproject_moments, damping_mode: See
            :class:`NaturalGaLore`.
        layerwise: Step each parameter inside its gradient hook and free its gradient (returns a
            :class:`NaturalGaLoreLayerwise`); needs ``gradient_accumulation_steps == 1`` and one process.
        betas: Adam's betas.
        eps: Adam's epsilon.
        gradient_accumulation_steps: The run's accumulation, checked when ``layerwise`` is set.

    Returns:
        A :class:`NaturalGaLore`, or a :class:`NaturalGaLoreLayerwise` when ``layerwise``.

    Raises:
        ZoftError: If nothing matches ``target_modules``, a hyperparameter is out of range, or ``layerwise``
            is combined with gradient accumulation or data parallelism.
    """
    groups = natural_galore_param_groups(
        model, target_modules, weight_decay, rank, update_proj_gap, scale, history, damping, reproject_moments,
        damping_mode,
    )
    kwargs = _adam_kwargs(lr, betas, eps)
    if not layerwise:
        return NaturalGaLore(groups, **kwargs)
    check_layerwise_compatible(gradient_accumulation_steps, _world_size())
    optimizer_dict: dict[torch.Tensor, torch.optim.Optimizer] = {}
    for group in groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            optimizer_dict[p] = NaturalGaLore([{"params": [p], **hyper}], **kwargs)
    # Keep model order so state_dict() lines up across runs regardless of grouping.
    order = {id(p): i for i, p in enumerate(model.parameters())}
    optimizer_dict = dict(sorted(optimizer_dict.items(), key=lambda kv: order[id(kv[0])]))
    return NaturalGaLoreLayerwise(optimizer_dict, lr=lr)


def natural_galore_cls_and_kwargs(model: nn.Module, lr: float, **kwargs: Any) -> tuple[type, dict[str, Any]]:
    """A ``(class, kwargs)`` pair for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    HF Trainer replaces its own parameter grouping when the kwargs carry ``params`` (and, for layer-wise
    dummies, ``optimizer_dict``), so the pair built here keeps the projected groups::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          optimizer_cls_and_kwargs=natural_galore_cls_and_kwargs(model, lr=1e-4, rank=128))

    Args:
        model: The model (the same object given to the Trainer).
        lr: Learning rate.
        **kwargs: Any argument of :func:`create_natural_galore_optimizer`.

    Returns:
        ``(NaturalGaLore, {"params": groups, ...})``, or for ``layerwise=True``
        ``(NaturalGaLoreLayerwise, {"optimizer_dict": ..., "lr": lr})`` (hooks are registered immediately).
    """
    if kwargs.get("layerwise"):
        opt = create_natural_galore_optimizer(model, lr, **kwargs)
        opt.remove_hooks()  # the Trainer builds the dummy again from optimizer_dict, which re-registers them
        return NaturalGaLoreLayerwise, {"optimizer_dict": opt.optimizer_dict, "lr": lr}
    adam = {k: kwargs.pop(k) for k in ("betas", "eps") if k in kwargs}
    kwargs.pop("gradient_accumulation_steps", None)
    kwargs.pop("layerwise", None)
    groups = natural_galore_param_groups(model, **kwargs)
    return NaturalGaLore, {"params": groups, "lr": lr, **adam}
