"""Seeded perturbation of trained parameters, the shared randomness every ZO method stands on.

z for a parameter is a pure function of ``(run seed, step, direction index, parameter name)``
(:func:`derive_seed`), never of the order parameters are visited in, the rank, or where a block
happens to live. That is what lets a run resume exactly, lets ``zoft replay`` rebuild a model from
its scalar log, and lets offloading and distributed ranks agree without exchanging tensors.

How a perturbed forward works here: a forward pre-hook on each module that owns trained
parameters swaps in ``theta + scale * z`` (a temporary) for that module's forward only, and a
post-hook swaps the stored tensor back. The stored values are never modified by a perturbation,
so "perturb +eps, -2eps, +eps" round-off drift (which collapses bf16 MeZO runs) cannot happen,
restore is bit-exact in every dtype, and memory stays at inference level plus one module's
temporary. z is generated once per module per forward and once more for the update: 3 passes of
sampling per step instead of MeZO's 4 (2 with the paired forward of :mod:`zoft.zo.paired`, which
runs both perturbed forwards in one forward of a doubled batch).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import nn

DISTRIBUTIONS = ("gaussian", "rademacher")


def derive_seed(run_seed: int, step: int, direction: int, name: str) -> int:
    """A 63-bit seed from (run seed, step, direction, parameter name), stable across processes."""
    digest = hashlib.blake2b(f"{run_seed}:{step}:{direction}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_z(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    *,
    device: torch.device | str = "cpu",
    distribution: str = "gaussian",
) -> torch.Tensor:
    """z ~ N(0, I) or Rademacher (+-1), fp32, from its own generator seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if distribution == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if distribution == "rademacher":
        bits = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8)
        return bits.to(torch.float32).mul_(2.0).sub_(1.0)
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    # Weight decay is skipped for biases and norm weights (1-D tensors), as HF Trainer does.
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


class ZOParameters:
    """The trained parameters of a model, named, with the seeded perturbation and the ZO update.

    Args:
        model: the model whose ``requires_grad`` parameters are trained (for a peft model, only
            the adapters).
        run_seed: the run's seed; every z derives from it.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        master_weights: ``"auto"`` keeps an fp32 copy of trained parameters stored in a lower
            precision (updates of ~1e-6 vanish below bf16 resolution otherwise), ``"fp32"``
            always, ``"none"`` never.
    """

    def __init__(
        self,
        model: nn.Module,
        run_seed: int,
        *,
        distribution: str = "gaussian",
        master_weights: str = "auto",
    ) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
        self.model = model
        self.run_seed = int(run_seed)
        self.distribution = distribution
        # named_parameters() yields a tied parameter once, under its first name: one z per tensor.
        self.params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to perturb")
        self.names_by_id = {id(p): n for n, p in self.params.items()}
        self.masters: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            if master_weights == "fp32" or (master_weights == "auto" and p.dtype != torch.float32):
                self.masters[name] = p.detach().to(torch.float32).clone()
        # Modules that own a trained parameter directly; a tied parameter has several owners.
        self._owners: list[tuple[nn.Module, list[tuple[str, str]]]] = []
        owner_count: dict[int, int] = {}
        for module in model.modules():
            owned = [
                (attr, self.names_by_id[id(p)])
                for attr, p in module._parameters.items()
                if p is not None and id(p) in self.names_by_id
            ]
            if owned:
                self._owners.append((module, owned))
                for _, name in owned:
                    owner_count[name] = owner_count.get(name, 0) + 1
        self._shared = {name for name, count in owner_count.items() if count > 1}
        self.z_generations = 0  # how many parameter tensors' z were sampled (cost accounting)

    # -- z -----------------------------------------------------------------------------------

    def seed(self, step: int, direction: int, name: str) -> int:
        return derive_seed(self.run_seed, step, direction, name)

    def z(self, name: str, step: int, direction: int) -> torch.Tensor:
        p = self.params[name]
        self.z_generations += 1
        return sample_z(p.shape, self.seed(step, direction, name), device=p.device, distribution=self.distribution)

    def value(self, name: str) -> torch.Tensor:
        """The exact current value of a trained parameter (its fp32 master if it has one)."""
        return self.masters.get(name, self.params[name].detach())

    def perturbed_value(self, name: str, step: int, direction: int, scale: float) -> torch.Tensor:
        p = self.params[name]
        z = self.z(name, step, direction)
        value = self.value(name)
        if value.dtype == torch.float64:
            z = z.to(torch.float64)
        # z becomes the temporary: z * scale + theta in at least fp32, then cast to the storage dtype.
        out = z.mul_(scale).add_(value)
        return out.to(p.dtype) if out.dtype != p.dtype else out

    def perturbed_pair(self, name: str, step: int, direction: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta + eps z, theta - eps z)`` from one sample of z, for the paired forward
        (:mod:`zoft.zo.paired`); each equals :meth:`perturbed_value` with ``+eps`` / ``-eps`` bit for bit."""
        p = self.params[name]
        z = self.z(name, step, direction)
        value = self.value(name)
        if value.dtype == torch.float64:
            z = z.to(torch.float64)
        plus = torch.mul(z, eps).add_(value)
        minus = z.mul_(-eps).add_(value)  # z * (-eps) is -(z * eps) exactly: the same rounding as perturbed_value
        return tuple(t.to(p.dtype) if t.dtype != p.dtype else t for t in (plus, minus))

    # -- the perturbed forward ----------------------------------------------------------------

    @contextlib.contextmanager
    def perturbed(self, step: int, direction: int, scale: float) -> Iterator[None]:
        """Within this context every forward sees ``theta + scale * z(step, direction)``.

        Stored parameter values are untouched; each module's temporary lives only during that
        module's forward (tied parameters: until the context exits, so both users see one z).
        """
        originals: dict[str, torch.Tensor] = {}

        def swap_in(module: nn.Module, owned: list[tuple[str, str]]) -> None:
            for attr, name in owned:
                if name in originals:  # a tied parameter already swapped by its other owner
                    continue
                p = module._parameters[attr]
                originals[name] = p.data
                p.data = self.perturbed_value(name, step, direction, scale)

        def swap_out(owned: list[tuple[str, str]]) -> None:
            for _attr, name in owned:
                if name in originals and name not in self._shared:
                    self.params[name].data = originals.pop(name)

        handles = []
        for module, owned in self._owners:
            handles.append(module.register_forward_pre_hook(lambda m, args, owned=owned: swap_in(m, owned)))
            handles.append(module.register_forward_hook(lambda m, args, out, owned=owned: swap_out(owned)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for name, data in originals.items():
                self.params[name].data = data

    # -- the update -----------------------------------------------------------------------------

    @torch.no_grad()
    def apply_update(
        self,
        step: int,
        coefficients: list[tuple[int, float]],
        lr: float,
        weight_decay: float = 0.0,
        names: list[str] | None = None,
    ) -> None:
        """theta -= lr * (sum_k c_k * z(step, k) + weight_decay * theta), per trained parameter.

        ``coefficients`` holds (direction, c_k) with c_k the (averaged) projected gradient of
        direction k already divided by the number of directions. Biases and norm weights get no
        decay. The same call is used by training and by ``zoft replay``, so both round alike.
        """
        for name in names if names is not None else self.params:
            p = self.params[name]
            target = self.masters.get(name, p.data)
            wd = 0.0 if _is_no_decay(name, p) else weight_decay
            if lr * wd != 0.0:
                target.mul_(1.0 - lr * wd)
            for direction, coef in coefficients:
                if lr * coef != 0.0:
                    target.add_(self.z(name, step, direction), alpha=-lr * coef)
            if name in self.masters:
                p.data.copy_(target)
        self._constrain()

    def _constrain(self) -> None:
        # Modules may keep their trained values in a valid range (e.g. positive quantization scales).
        for module, owned in self._owners:
            fn = getattr(module, "constrain_", None)
            if callable(fn):
                fn()
                for attr, name in owned:
                    if name in self.masters:
                        self.masters[name].copy_(module._parameters[attr].data)

    # -- checkpointing of the fp32 masters ------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.masters.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            if name in self.masters:
                self.masters[name].copy_(tensor)
                self.params[name].data.copy_(tensor)
