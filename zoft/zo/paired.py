"""The paired forward: both perturbed forwards of a ZO step in one pass over a doubled batch.

ZO2 ("ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models with Limited GPU
Memory", Wang et al., 2025, https://arxiv.org/abs/2503.12668) runs the +eps and the -eps forward of a
block while it is resident, so with offloading each block crosses PCIe once per step instead of twice.
This module does it for any model, with no per-model copy of HF forward code: the batch is doubled,
``[x; x]``, and every module that owns trained parameters runs its forward on the two halves apart, the
first with ``theta + eps z`` and the second with ``theta - eps z`` from one sample of z, and returns the
halves concatenated. Saves one pass over the weights (one upload per offloaded block) and one sampling
of z per parameter and step; costs the activation memory of a doubled batch. A deferred update (ZO2)
pending for a parameter is handed to its first pair of copies, so with philox z the update and both
perturbed copies are one fused pass over the weight.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from zoft.zo.perturb import ZOParameters


def double_batch(tree: Any, batch_size: int) -> Any:
    """``[x; x]``: every tensor in ``tree`` (dicts, lists, tuples) whose dim 0 is ``batch_size``, twice
    along dim 0; anything else (e.g. a verbalizer's candidate ids) as it is."""
    if torch.is_tensor(tree):
        return torch.cat([tree, tree]) if tree.ndim and tree.shape[0] == batch_size else tree
    if isinstance(tree, dict):
        return _rebuild(tree, {k: double_batch(v, batch_size) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [double_batch(v, batch_size) for v in tree])
    return tree


def _split(tree: Any, rows: set[int], found: list[bool]) -> tuple[Any, Any]:
    # Only tensors whose dim 0 is a doubled row count are split: others (a [1, T] position_ids that
    # broadcasts over the batch, a mask shared by all samples) serve both halves as they are.
    if torch.is_tensor(tree):
        if tree.ndim and tree.shape[0] % 2 == 0 and tree.shape[0] // 2 in rows:
            found[0] = True
            half = tree.shape[0] // 2
            return tree[:half], tree[half:]
        return tree, tree
    if isinstance(tree, dict):
        items = {k: _split(v, rows, found) for k, v in tree.items()}
        return _rebuild(tree, {k: a for k, (a, _) in items.items()}), _rebuild(tree, {k: b for k, (_, b) in items.items()})
    if isinstance(tree, (list, tuple)):
        pairs = [_split(v, rows, found) for v in tree]
        return _rebuild(tree, [a for a, _ in pairs]), _rebuild(tree, [b for _, b in pairs])
    return tree, tree


def _rebuild(like: Any, values: Any) -> Any:
    # A container of the same type as ``like`` (dict, ModelOutput, list, tuple, namedtuple) holding ``values``.
    if isinstance(like, dict):
        return dict(values) if type(like) is dict else type(like)(**values)
    return type(like)(*values) if hasattr(like, "_fields") else type(like)(values)


def _join(first: Any, second: Any, rows: set[int], broadcast: bool, where: str) -> Any:
    if torch.is_tensor(first):
        if first.ndim and first.shape[0] in rows and second.shape == first.shape:
            return torch.cat([first, second])
        if broadcast and first.ndim and first.shape[0] == 1:
            # No input was per sample (GPT-2's position embedding of a [1, T] position_ids): the output
            # broadcasts over the batch, so each half's output is repeated over that half.
            n = min(rows)
            return torch.cat([first.expand(n, *first.shape[1:]), second.expand(n, *second.shape[1:])])
        raise ValueError(
            f"paired forward: {where} returned a tensor of shape {tuple(first.shape)} per half, whose dim 0 is "
            f"not the batch or its tokens ({' or '.join(map(str, sorted(rows)))}); this model needs "
            "method.paired_forward: false"
        )
    if isinstance(first, dict):
        return _rebuild(first, {k: _join(v, second[k], rows, broadcast, where) for k, v in first.items()})
    if isinstance(first, (list, tuple)):
        return _rebuild(first, [_join(a, b, rows, broadcast, where) for a, b in zip(first, second)])
    if first is second or first == second:
        return first
    raise ValueError(
        f"paired forward: {where} returned different non-tensor values for the two halves ({first!r}, {second!r}); "
        "this model needs method.paired_forward: false"
    )


@contextlib.contextmanager
def paired_perturbation(
    zo: ZOParameters, step: int, direction: int, eps: float, batch_size: int, seq_len: int | None = None
) -> Iterator[None]:
    """Within this context a forward of the doubled batch ``[x; x]`` computes ``f(theta + eps z; x)`` in
    its first ``batch_size`` rows and ``f(theta - eps z; x)`` in the rest.

    Each module that owns trained parameters (``zo._owners``) runs its forward twice, on the halves of
    every argument whose dim 0 is ``2 * batch_size`` (or ``2 * batch_size * seq_len``: the tokens of the
    doubled batch flattened sample by sample, as OPT's MLP sees them), with its parameters swapped for ``theta + eps z``
    and then ``theta - eps z`` (:meth:`ZOParameters.perturbed_pair`: one sample of z per parameter and
    call; a tied parameter keeps its pair until the context exits, so all its owners see one z), and
    returns the two outputs concatenated along dim 0 (tuples, lists and dicts of them element-wise).
    Stored values are never modified, except by a deferred update pending for a parameter
    (``zo.pending_update``, ZO2), which is applied (fused, with philox z) as its pair is made. Forward hooks
    of the module (offloading) run once around both halves, so an offloaded block is resident for both.

    Assumption: every computation outside those modules treats each sample on its own (attention,
    activations, residuals, norms and rotary embeddings without trained parameters), so the two halves
    are exactly the +eps and the -eps forward, and tensors are batch-first. Dense decoder LMs satisfy it;
    modules that mix samples do not (e.g. MoE routers with a per-batch capacity limit, batch norm in
    training mode). A module output that is neither one row per sample nor per token raises
    ``ValueError`` rather than mixing the halves.

    Args:
        zo: the trained parameters and their seeded perturbation.
        step, direction: fix z, as for :meth:`ZOParameters.perturbed`.
        eps: perturbation scale.
        batch_size: rows of the undoubled batch (the model's ``input_ids.shape[0]``).
        seq_len: its tokens per row (``input_ids.shape[1]``); ``None``: only whole rows are split.
    """
    rows = {batch_size} | ({batch_size * seq_len} if seq_len else set())
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    half: list[int] = []  # the half an enclosing owner module is computing (a nested owner sees it only)
    seen: set[str] = set()

    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        seen.add(name)
        if name in shared:
            return shared[name]
        update = zo.pending_update(name) if zo.pending_update is not None else None
        values = zo.perturbed_pair(name, step, direction, eps, update)
        if name in zo._shared:
            shared[name] = values
        return values

    def call_half(module, values, i, inner, args, kwargs):
        # By name, not module._parameters: an owner may hold a parameter through a ParameterDict child.
        originals = {name: zo.params[name].data for name in values}
        for name, v in values.items():
            zo.params[name].data = v[i]
        half.append(i)
        try:
            return inner(*args, **kwargs)
        finally:
            half.pop()
            for name, data in originals.items():
                zo.params[name].data = data

    def forward(module: nn.Module, owned: list[tuple[str, str]], inner, *args, **kwargs):
        values = {name: pair(name) for _, name in owned}
        if half:  # inside an owner's forward on one half: the inputs are that half already
            return call_half(module, values, half[-1], inner, args, kwargs)
        found = [False]
        first, second = _split((args, kwargs), rows, found)
        out_plus = call_half(module, values, 0, inner, *first)
        out_minus = call_half(module, values, 1, inner, *second)
        return _join(out_plus, out_minus, rows, not found[0], type(module).__name__)

    patched = []
    # After the first paired forward of the whole model, every trained parameter must have been paired.
    coverage = zo.model.register_forward_hook(lambda m, args, out: zo.check_coverage(seen))
    # Marks a perturbed forward: the deferred optimizer's hook then leaves pending updates to pair().
    zo._perturbing += 1
    try:
        for module, owned in zo._owners:
            # The forward found now may itself be an instance attribute (accelerate's hooks): put it back after.
            patched.append((module, module.__dict__.get("forward")))
            module.forward = functools.partial(forward, module, owned, module.forward)
        yield
    finally:
        coverage.remove()
        zo._perturbing -= 1
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
