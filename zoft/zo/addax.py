"""Addax: zeroth-order estimates on long sequences + in-place first-order SGD on short ones.

Paper: "Addax: Utilizing Zeroth-Order Gradients to Improve Memory Efficiency and Performance of SGD for
Fine-Tuning Language Models" (Li et al., 2024), https://arxiv.org/abs/2410.06441. The training data is
split at a token length L_T: each step draws K0 sequences longer than L_T for a two-forward SPSA estimate
g0 (MeZO, no activations kept) and K1 shorter ones for a backward pass, and updates
``theta -= lr * (alpha * g0 * z + (1 - alpha) * grad1)``. The first-order part is in-place SGD: each
parameter is updated by a post-accumulate-grad hook as soon as its gradient exists and the gradient is
freed, so no full gradient and no optimizer state is ever held; z for the same update is regenerated in
the hook from the parameter's seed. It saves what MeZO saves on long sequences while converging like SGD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zoft.errors import ZoftError
from zoft.zo.estimate import DirectionEstimate, spsa
from zoft.zo.perturb import ZOParameters, _is_no_decay

# Why train.fp16 is refused (zoft.config and ZoftTrainer say it): HF pairs fp16 autocast with a dynamic loss
# scale, which skips a step whose scaled gradients overflow. Addax's first-order part has applied most of
# such a step before any overflow shows, and unscaled fp16 activation gradients underflow instead.
FP16_REFUSAL = (
    "train.fp16 with method 'addax': the first-order part updates each parameter in place during the backward, "
    "so an fp16 loss scale cannot skip a step that overflows and without one small fp16 gradients underflow; "
    "use train.bf16 (bfloat16 autocast needs no loss scale) or model.dtype bfloat16"
)


@dataclass
class AddaxConfig:
    """Addax settings as plain values (the recipe's method section after resolution).

    Args:
        length_threshold: L_T in tokens; sequences longer than it go to the zeroth-order part.
        alpha: weight of the zeroth-order estimate; 1 - alpha weighs the first-order gradient.
        zo_batch_size: K0, long sequences per step.
        fo_batch_size: K1, short sequences per step.
    """

    length_threshold: int
    alpha: float = 0.05
    zo_batch_size: int = 16
    fo_batch_size: int = 16


# -- data split ---------------------------------------------------------------------------------


def split_by_length(lengths: Sequence[int], threshold: int) -> tuple[list[int], list[int]]:
    """Indices of the sequences longer than ``threshold`` (zeroth-order) and the others (first-order)."""
    long = [i for i, n in enumerate(lengths) if n > threshold]
    short = [i for i, n in enumerate(lengths) if n <= threshold]
    return long, short


def check_split(lengths: Sequence[int], threshold: int, alpha: float, what: str = "method.length_threshold") -> None:
    """Refuse a threshold that leaves a side with weight empty for the whole data set.

    An empty side is allowed only when its weight is zero: all-long data with ``alpha == 1`` is MeZO,
    all-short data with ``alpha == 0`` is in-place SGD.

    Raises:
        ZoftError: one line with how many sequences fall on each side and the length range.
    """
    long, short = split_by_length(lengths, threshold)
    side = None
    if not long and alpha > 0:
        side = "zeroth-order (longer)"
    elif not short and alpha < 1:
        side = "first-order (not longer)"
    if side is None:
        return
    raise ZoftError(
        f"{what}: {threshold} leaves the {side} side empty: {len(long)} of {len(lengths)} training sequences "
        f"are longer than {threshold} tokens and {len(short)} are not (lengths {min(lengths)}-{max(lengths)}); "
        f"choose a threshold in that range, or set method.alpha to {1 if not short else 0} to train one side only"
    )


def activation_bytes(length: int, batch: int, config, dtype_bytes: int = 4) -> int:
    """Activation memory of one forward+backward of a decoder at ``batch x length`` tokens (an estimate).

    Per layer ``b*s*h*(34 + 5*a*s/h)`` bytes at 16-bit (Korthikanti et al. 2022, arXiv 2205.05198,
    no recomputation), scaled to ``dtype_bytes``, plus the logits and their gradient in fp32.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, vocab = config.num_attention_heads, config.vocab_size
    per_layer = batch * length * h * (34 + 5 * heads * length / h) * dtype_bytes / 2
    return int(layers * per_layer + 2 * batch * length * vocab * 4)


def auto_length_threshold(
    model: nn.Module, budget_gb: float, fo_batch_size: int, max_length: int
) -> int:
    """L_T from a memory budget: the longest first-order batch that fits next to the weights.

    Rule: ``budget - weights - largest trained tensor (its gradient, alive for one hook) - largest
    weight (one ZO temporary)`` must hold :func:`activation_bytes` of ``fo_batch_size x L_T``; L_T is the
    largest such length up to ``max_length``. Longer sequences cost no activations (zeroth-order).

    Raises:
        ZoftError: if not even one token per sequence fits.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    largest = max((t.numel() * t.element_size() for t in tensors), default=0)
    trained = max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), default=0)
    available = budget_gb * 1e9 - weights - trained - largest
    dtype_bytes = next(iter(model.parameters())).element_size()
    config = model.config
    if available <= 0 or activation_bytes(1, fo_batch_size, config, dtype_bytes) > available:
        raise ZoftError(
            f"method.memory_budget_gb: {budget_gb} GB does not fit the weights ({weights / 1e9:.2f} GB) and a "
            f"first-order batch of {fo_batch_size}; raise the budget or lower method.fo_batch_size"
        )
    lo, hi = 1, max_length
    while lo < hi:  # activation memory grows with length: the largest length that fits
        mid = (lo + hi + 1) // 2
        if activation_bytes(mid, fo_batch_size, config, dtype_bytes) <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- the combined loader --------------------------------------------------------------------------


class AddaxLoader:
    """Yields ``{"zo": long batch or None, "fo": short batch or None}`` per step.

    An epoch is one pass over the side with more batches; the other side restarts (with a new epoch seed
    where its sampler has one) when it runs out. A side with no loader yields ``None``.

    Resuming mid-epoch: HF Trainer hands its loader to accelerate's ``skip_first_batches``, which rebuilds a
    torch ``DataLoader`` from the loader's ``dataset`` and ``batch_sampler``. Here those are the epoch's steps
    (:class:`_AddaxSteps`, read in order, one step per batch of one index), so the rebuilt loader yields this
    loader's steps from the given one on, and HF's ``set_epoch`` reaches this loader through the sampler.
    """

    # What accelerate's skip_first_batches reads besides dataset / batch_sampler: steps are fetched in this
    # process, each "batch" of one step is that step itself.
    sampler = None
    num_workers = 0
    prefetch_factor = None
    batch_size = 1
    drop_last = False

    def __init__(self, zo_loader, fo_loader):
        if zo_loader is None and fo_loader is None:
            raise ValueError("Addax needs at least one of the two loaders")
        self.zo_loader, self.fo_loader = zo_loader, fo_loader
        self._epoch = 0
        self.dataset = _AddaxSteps(self)
        self.batch_sampler = _AddaxStepSampler(self)

    @staticmethod
    def collate_fn(steps: list[dict]) -> dict:
        return steps[0]

    def __len__(self) -> int:
        return max(len(x) for x in (self.zo_loader, self.fo_loader) if x is not None)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.dataset.restart()
        for loader in (self.zo_loader, self.fo_loader):
            if loader is not None and hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)

    def _cycle(self, loader) -> Iterator:
        if loader is None:
            while True:
                yield None
        restarts = 0
        while True:
            yield from loader
            restarts += 1
            if hasattr(loader, "set_epoch"):
                # A distinct seed per restart so the shorter side is reshuffled, never the same order twice:
                # first passes use the epoch itself (0, 1, ...), restarts (epoch + 1) * 100003 + restart.
                loader.set_epoch((self._epoch + 1) * 100_003 + restarts)

    def __iter__(self) -> Iterator[dict]:
        zo_it, fo_it = self._cycle(self.zo_loader), self._cycle(self.fo_loader)
        for _ in range(len(self)):
            yield {"zo": next(zo_it), "fo": next(fo_it)}


class _AddaxSteps(torch.utils.data.Dataset):
    """The steps of the current epoch of an :class:`AddaxLoader`, by index, read in increasing order.

    Step i is only reachable by drawing steps 0..i-1 first (the samplers and the restarts of the shorter side
    are sequential), so a request past the next step draws and drops the ones in between (collating them, no
    forward), and a request before it starts the epoch over; ``set_epoch`` starts it over too.
    """

    def __init__(self, loader: AddaxLoader):
        self.loader = loader
        self._it: Iterator[dict] | None = None
        self._next = 0

    def __len__(self) -> int:
        return len(self.loader)

    def restart(self) -> None:
        self._it, self._next = None, 0

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"step {index} of an Addax epoch of {len(self)} steps")
        if self._it is None or index < self._next:
            self._it, self._next = iter(self.loader), 0
        while self._next < index:
            next(self._it)
            self._next += 1
        self._next += 1
        return next(self._it)


class _AddaxStepSampler(torch.utils.data.Sampler):
    """Batches of one step index, in order; ``set_epoch`` is the loader's (HF calls it on a resumed epoch)."""

    def __init__(self, loader: AddaxLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[int]]:
        return ([i] for i in range(len(self.loader)))

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


# -- the update -------------------------------------------------------------------------------------


@dataclass
class AddaxStepResult:
    estimates: list[DirectionEstimate]
    coefficients: list[tuple[int, float]]  # (direction, alpha * g / n_directions): the applied ZO part
    fo_loss: float | None
    in_place_updates: int  # parameters updated by the backward hooks


@torch.no_grad()
def _update_one(
    zo: ZOParameters,
    name: str,
    grad: torch.Tensor | None,
    step: int,
    coefficients: list[tuple[int, float]],
    lr: float,
    weight_decay: float,
    fo_weight: float,
) -> None:
    p = zo.params[name]
    if name in zo.rounding:
        # bf16/fp16 without a master: the mixed update in fp32, rounded back once (seeded, zoft.zo.lowprec).
        dense = None if grad is None or lr * fo_weight == 0.0 else (grad, lr * fo_weight)
        zo.rounded_update(name, step, coefficients, lr, weight_decay, dense=dense)
        return
    target = zo.masters.get(name, p.data)
    wd = 0.0 if _is_no_decay(name, p) else weight_decay
    if lr * wd != 0.0:
        target.mul_(1.0 - lr * wd)
    if grad is not None and lr * fo_weight != 0.0:
        target.add_(grad, alpha=-lr * fo_weight)
    for direction, coef in coefficients:
        if lr * coef != 0.0:
            target.add_(zo.z(name, step, direction), alpha=-lr * coef)
    if name in zo.masters:
        p.data.copy_(target)


def addax_step(
    zo: ZOParameters,
    *,
    step: int,
    lr: float,
    alpha: float,
    eps: float,
    zo_loss: Callable[[], torch.Tensor] | None,
    fo_backward: Callable[[], torch.Tensor] | None,
    weight_decay: float = 0.0,
    n_directions: int = 1,
) -> AddaxStepResult:
    """One Addax step: the SPSA estimate on the long batch, then a backward on the short batch that
    updates each parameter in place as soon as its gradient is accumulated.

    Both parts are evaluated at the same theta (the SPSA forwards run first and leave the weights
    untouched), so the result is ``theta - lr * (alpha * sum_k g_k z_k / n + (1 - alpha) * grad1 + wd *
    theta)`` whatever order the hooks fire in (z depends only on (seed, step, k, name)).

    Args:
        zo: the trained parameters and their seeded perturbation.
        step: the optimizer step (fixes z).
        lr: the learning rate of this step.
        alpha: weight of the zeroth-order part (0: skipped, 1: no backward).
        eps: SPSA perturbation scale.
        zo_loss: loss of the long batch at the current weights, or ``None`` when there is none.
        fo_backward: computes the short batch's loss and calls ``backward`` on it, returning the loss;
            ``None`` when there is no short batch.
        weight_decay: decoupled decay (not on biases and norm weights), applied once per step.
        n_directions: SPSA directions averaged.

    Returns:
        The estimates, the applied ZO coefficients, the first-order loss and the hook count.
    """
    estimates: list[DirectionEstimate] = []
    if alpha > 0 and zo_loss is not None:
        estimates = spsa(zo, zo_loss, step=step, eps=eps, n_directions=n_directions)
    coefficients = [(e.direction, alpha * e.projected_grad / n_directions) for e in estimates]
    fo_weight = 1.0 - alpha
    fo_loss = None
    done: set[str] = set()
    if fo_weight > 0 and fo_backward is not None:

        def hook(param: torch.Tensor, name: str) -> None:
            _update_one(zo, name, param.grad, step, coefficients, lr, weight_decay, fo_weight)
            param.grad = None  # freed at once: no full gradient is ever held
            done.add(name)

        handles = [
            p.register_post_accumulate_grad_hook(lambda param, name=name: hook(param, name))
            for name, p in zo.params.items()
        ]
        try:
            with torch.enable_grad():
                fo_loss = float(torch.as_tensor(fo_backward()).detach())
        finally:
            for h in handles:
                h.remove()
    # Parameters the backward did not reach (or every parameter when there was no backward) still get
    # the zeroth-order part and the decay.
    for name in zo.params:
        if name not in done:
            _update_one(zo, name, None, step, coefficients, lr, weight_decay, fo_weight)
    zo._constrain()
    return AddaxStepResult(estimates, coefficients, fo_loss, len(done))
