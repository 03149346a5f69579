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

Two z generators: ``"torch"`` samples z with a ``torch.Generator`` (fast on CPU, but its numbers differ
between CPU and CUDA), ``"philox"`` uses the Philox stream of ``zoft.kernels.zo_reference`` through
``zoft.kernels.zo_ops`` (the fused Triton kernels on CUDA, z in registers; the plain-torch reference
elsewhere), the same z on every device, so a CUDA run replays on CPU and an offloaded block sees one z
wherever it is updated.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from zoft.errors import ZoftError
from zoft.kernels.zo_ops import zo_ops
from zoft.zo.lowprec import CHUNK, RoundingBits, one_cpu_thread, rounded_write_, rounding_seed

DISTRIBUTIONS = ("gaussian", "rademacher")
Z_GENERATORS = ("torch", "philox")
MASTER_WEIGHTS = ("auto", "fp32", "none")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_MAX_KERNEL_DIRECTIONS = 4  # directions one fused kernel call applies (more: several calls)


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


def resolve_z_generator(choice: str, on_cuda: bool) -> str:
    """``"auto"`` -> ``"philox"`` when the trained parameters are computed on CUDA, else ``"torch"``.

    On CPU the plain-torch Philox reference is several times slower than ``torch.randn`` (Gaussian z of a
    576 x 1536 fp32 matrix: 28 ms vs 3.1 ms, ~9x; Rademacher ~7x; one core here), so ``auto`` keeps the
    torch generator there.

    Raises:
        ZoftError: ``choice`` is not auto, torch or philox.
    """
    if choice == "auto":
        return "philox" if on_cuda else "torch"
    if choice not in Z_GENERATORS:
        raise ZoftError(f"z_generator {choice!r} is not one of auto, torch, philox")
    return choice


def _kernel_ready(t: torch.Tensor) -> bool:
    # The z kernels index z by flat offset and compute in fp32 from 16/32-bit storage.
    return t.dtype in _KERNEL_DTYPES and t.is_contiguous()


def _runs_forward(module: nn.Module) -> bool:
    # Containers (ParameterDict, ParameterList, ModuleDict, ModuleList) have no forward of their own:
    # whoever holds them reads their entries directly.
    return type(module).forward is not nn.Module.forward


def perturbation_owners(model: nn.Module, names_by_id: dict[int, str]) -> list[tuple[nn.Module, list[tuple[str, str]]]]:
    """The modules whose forward sees each trained parameter, with ``(attribute path, parameter name)`` pairs.

    A parameter belongs to the module that holds it, unless that module has no forward of its own (a
    ``ParameterDict``, e.g. peft's ``lora_embedding_A`` / ``lora_embedding_B``, which ``lora.Embedding.forward``
    reads directly): then to its nearest ancestor that has one, the path naming it from there
    (``"lora_embedding_A.default"``). A tied parameter has several owners.

    Args:
        model: the model.
        names_by_id: ``id(parameter) -> name`` of the trained parameters.
    """
    parents: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for child_name, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), (module, child_name))
    owners: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is None or id(p) not in names_by_id:
                continue
            owner, path = module, attr
            while not _runs_forward(owner) and id(owner) in parents:
                owner, child_name = parents[id(owner)]
                path = f"{child_name}.{path}"
            owners.setdefault(id(owner), (owner, []))[1].append((path, names_by_id[id(p)]))
    return list(owners.values())


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    # Weight decay is skipped for biases and norm weights (1-D tensors), as HF Trainer does.
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def _half_perturbed(value: torch.Tensor, z: torch.Tensor, scales: tuple[float, ...]) -> list[torch.Tensor]:
    """``value + s * z`` for each scale ``s``, as the fp32 path computes it (``(z * s) + value`` in fp32, cast to
    ``value``'s 16-bit dtype), one cache-sized chunk at a time: no full-size fp32 temporary beyond z, and no
    mixed-dtype add (a slow, unvectorized loop on CPU)."""
    outs = [torch.empty(value.shape, dtype=value.dtype, device=value.device) for _ in scales]
    flat_v, flat_z, flat_outs = value.reshape(-1), z.view(-1), [o.view(-1) for o in outs]
    n = flat_v.numel()
    v32 = torch.empty(min(n, CHUNK), dtype=torch.float32, device=value.device)
    tmp = torch.empty_like(v32)
    with one_cpu_thread(value.device):
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            v = v32[: b - a].copy_(flat_v[a:b])
            for out, s in zip(flat_outs, scales):
                out[a:b] = torch.mul(flat_z[a:b], s, out=tmp[: b - a]).add_(v)
    return outs


class _ZPrefetch:
    """Draws the torch z of the coming ``(name, direction)`` pairs of one update on a worker thread, one ahead.

    At most one z beyond the one in use is alive (the update's temporaries at most double). :meth:`take`
    returns ``None`` for anything it was not asked to draw; the caller then draws it itself.
    """

    def __init__(self, zo: ZOParameters, step: int, order: list[tuple[str, int]]) -> None:
        self.zo, self.step, self.order, self.next = zo, step, order, 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoft-z")
        self.pending: dict[tuple[str, int], Future] = {}
        self._submit()

    def _submit(self) -> None:
        if self.next < len(self.order):
            name, k = self.order[self.next]
            self.next += 1
            p = self.zo.params[name]
            seed = self.zo.seed(self.step, k, name)
            self.pending[(name, k)] = self.pool.submit(
                sample_z, p.shape, seed, device=p.device, distribution=self.zo.distribution
            )

    def take(self, step: int, name: str, direction: int) -> torch.Tensor | None:
        future = self.pending.pop((name, direction), None) if step == self.step else None
        if future is None:
            return None
        self._submit()
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ZOParameters:
    """The trained parameters of a model, named, with the seeded perturbation and the ZO update.

    Args:
        model: the model whose ``requires_grad`` parameters are trained (for a peft model, only
            the adapters).
        run_seed: the run's seed; every z derives from it.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        master_weights: how trained parameters stored in bf16/fp16 are updated. ``"auto"`` (default):
            the update is computed in fp32 one chunk at a time and written back with seeded stochastic
            rounding (:mod:`zoft.zo.lowprec`), so updates far below bf16 resolution survive in
            expectation and nothing is kept beyond the weights; ``"fp32"``: an fp32 copy (master) of
            each such parameter is updated and copied to it (4 more bytes per parameter); ``"none"``:
            fp32 update math rounded to nearest (updates below half a spacing are lost). fp32
            parameters are updated in place in fp32 under every setting.
        z_generator: ``"torch"`` (default; ``torch.Generator``, device-dependent numbers),
            ``"philox"`` (the device-independent Philox stream, through the fused kernels on CUDA) or
            ``"auto"`` (philox when the parameters are computed on CUDA, see
            :func:`resolve_z_generator`).
        compute_device: where the parameters are computed when that is not where they are stored
            (ZO2 offload); only used to resolve ``z_generator="auto"``.

    Attributes:
        z_generations: z streams generated for one parameter tensor (one per parameter and direction).
        weight_passes: passes over a trained tensor (or its fp32 master) by the perturb/update ops,
            each one read and one write; the master -> storage copy after an update counts as one.
        pending_update: set by :class:`zoft.zo.offload.DeferredMeZOOptimizer`: ``name -> (step,
            coefficients, lr, weight_decay)`` or ``None``, the deferred update a perturbed forward must
            apply first (with philox, fused into the perturbation: one pass instead of two).
        rounding: ``name -> (dtype, "stochastic" | "nearest")`` for each parameter whose updated value is
            rounded to a 16-bit dtype (no master): half-precision parameters, and offloaded blocks stored in
            16 bits but computed in fp32 (:meth:`round_to_storage`).
        device: where z and the rounding bits are drawn (the compute device).
    """

    def __init__(
        self,
        model: nn.Module,
        run_seed: int,
        *,
        distribution: str = "gaussian",
        master_weights: str = "auto",
        z_generator: str = "torch",
        compute_device: torch.device | str | None = None,
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
        if master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"unknown master_weights {master_weights!r}; expected one of {MASTER_WEIGHTS}")
        self.master_weights = master_weights
        self.masters: dict[str, torch.Tensor] = {}
        self.rounding: dict[str, tuple[torch.dtype, str]] = {}
        for name, p in self.params.items():
            if p.dtype not in _HALF_DTYPES:
                continue  # fp32 (or wider) parameters are updated in place, as they always were
            if master_weights == "fp32":
                self.masters[name] = p.detach().to(torch.float32).clone()
            else:
                self.rounding[name] = (p.dtype, "stochastic" if master_weights == "auto" else "nearest")
        # The modules whose forward swaps in a trained parameter's perturbed value (a tied parameter has
        # several): see perturbation_owners.
        self._owners: list[tuple[nn.Module, list[tuple[str, str]]]] = perturbation_owners(model, self.names_by_id)
        owner_count: dict[str, int] = {}
        for _, owned in self._owners:
            for _, name in owned:
                owner_count[name] = owner_count.get(name, 0) + 1
        self._shared = {name for name, count in owner_count.items() if count > 1}
        # A module that clamps its values after an update (QZO's scales) must do so before the next
        # perturbation reads them, so its parameters are never updated and perturbed in one fused pass.
        self._constrained = {
            name for module, owned in self._owners if callable(getattr(module, "constrain_", None)) for _, name in owned
        }
        on_cuda = (compute_device is not None and torch.device(compute_device).type == "cuda") or any(
            p.device.type == "cuda" for p in self.params.values()
        )
        self.z_generator_requested = z_generator
        self.z_generator = resolve_z_generator(z_generator, on_cuda)
        self.device = torch.device(compute_device) if compute_device is not None else next(iter(self.params.values())).device
        offloaded_to_cuda = compute_device is not None and torch.device(compute_device).type == "cuda"
        if self.z_generator == "torch" and offloaded_to_cuda and any(m.device.type != "cuda" for m in self.masters.values()):
            # The fp32 masters stay in CPU memory while the blocks compute on the GPU: the update would draw z
            # on the CPU and the perturbation on the GPU, and torch.Generator's numbers differ between them.
            raise ZoftError(
                "method.z_generator: torch with offload to CUDA and fp32 master weights would draw z on two devices "
                "(torch.Generator's numbers differ between the CPU masters and the GPU blocks); use method.z_generator "
                "philox (what auto picks) or model.dtype float32"
            )
        self.z_generations = 0  # how many parameter tensors' z were sampled (cost accounting)
        self.weight_passes = 0
        self.pending_update: Callable[[str], tuple[int, list[tuple[int, float]], float, float] | None] | None = None
        self._perturbing = 0
        self._coverage_checked = False  # check_coverage passed once
        self._prefetch: _ZPrefetch | None = None

    def adopt_z_generator(self, recorded: str) -> None:
        """Continue a run with the z generator it was started with (on resume from a checkpoint).

        ``z_generator="auto"`` follows the recorded one; an explicit different choice is refused, since
        the resumed steps would draw other directions than the logged ones.

        Raises:
            ZoftError: the run was started with another, explicitly different generator.
        """
        if recorded == self.z_generator:
            return
        if self.z_generator_requested != "auto":
            raise ZoftError(
                f"method.z_generator: the checkpoint was trained with {recorded!r} z, this run asks for "
                f"{self.z_generator!r}; set method.z_generator: {recorded} (or auto) to resume it"
            )
        self.z_generator = resolve_z_generator(recorded, False)

    # -- z -----------------------------------------------------------------------------------

    def seed(self, step: int, direction: int, name: str) -> int:
        return derive_seed(self.run_seed, step, direction, name)

    def z(self, name: str, step: int, direction: int) -> torch.Tensor:
        """z of a parameter for (step, direction), materialized in fp32 on the parameter's device."""
        p = self.params[name]
        self.z_generations += 1
        if self._prefetch is not None:
            ready = self._prefetch.take(step, name, direction)
            if ready is not None:
                return ready
        seed = self.seed(step, direction, name)
        if self.z_generator == "torch":
            return sample_z(p.shape, seed, device=p.device, distribution=self.distribution)
        return self._philox_z(seed, p.shape, p.device)

    def _philox_z(self, seed: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        # The backend's own z (w = 0, eps = 1 is exact), so a materialized z (Addax, checks) equals what
        # the kernels add on CUDA bit for bit, not only to the few ulp between kernel and reference.
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)
        return zo_ops(device).perturbed_copy(zeros, seed, 1.0, zeros, rademacher=self._rademacher)

    @property
    def _rademacher(self) -> bool:
        return self.distribution == "rademacher"

    def value(self, name: str) -> torch.Tensor:
        """The exact current value of a trained parameter (its fp32 master if it has one)."""
        return self.masters.get(name, self.params[name].detach())

    def perturbed_value(
        self,
        name: str,
        step: int,
        direction: int,
        scale: float,
        update: tuple[int, list[tuple[int, float]], float, float] | None = None,
    ) -> torch.Tensor:
        """``theta + scale * z(step, direction)`` as a new tensor in the parameter's dtype and device.

        Args:
            name: the trained parameter.
            step, direction: which z.
            scale: the perturbation scale (+-eps).
            update: a deferred ``(step, coefficients, lr, weight_decay)`` to apply to the stored value
                first (see :meth:`apply_update`). With philox and a fused-capable tensor the update and
                the perturbation are one pass (``fused_update_perturb``); the result is the same bits as
                update-then-perturb.
        """
        p = self.params[name]
        if update is not None:
            target = self.masters.get(name, p.data)
            if self._can_fuse(name, target):
                out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                self._philox_update(name, target, *update, pert=(self.seed(step, direction, name), scale, out))
                self._sync_master(name)  # the stored bf16/fp16 value of the updated master
                return out
            self.apply_update(*update, names=[name])
        value = self.value(name)
        self.weight_passes += 1
        if self.z_generator == "philox" and _kernel_ready(value) and p.dtype in _KERNEL_DTYPES:
            self.z_generations += 1
            # An fp32 master kept in CPU memory for an offloaded block computing elsewhere: z does not
            # depend on the device, so perturb where the block computes.
            value = value.to(p.device)
            out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            ops = zo_ops(p.device)
            return ops.perturbed_copy(value, self.seed(step, direction, name), scale, out, rademacher=self._rademacher)
        z = self.z(name, step, direction)
        if value.dtype in _HALF_DTYPES and value.dtype == p.dtype:
            return _half_perturbed(value, z, (scale,))[0]
        if value.dtype == torch.float64:
            z = z.to(torch.float64)
        # z becomes the temporary: z * scale + theta in at least fp32, then cast to the storage dtype.
        out = z.mul_(scale).add_(value)
        return out.to(p.dtype) if out.dtype != p.dtype else out

    def _can_fuse(self, name: str, target: torch.Tensor) -> bool:
        p = self.params[name]
        return (
            self.z_generator == "philox"
            and _kernel_ready(target)
            and p.dtype in _KERNEL_DTYPES
            and target.device == p.device
            and name not in self._constrained
        )

    def perturbed_pair(
        self,
        name: str,
        step: int,
        direction: int,
        eps: float,
        update: tuple[int, list[tuple[int, float]], float, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta + eps z, theta - eps z)`` from one sample of z, for the paired forward
        (:mod:`zoft.zo.paired`); each equals :meth:`perturbed_value` with ``+eps`` / ``-eps`` bit for bit.

        ``update``: a deferred update to apply first, as for :meth:`perturbed_value`. With philox and a
        kernel-ready tensor the update and both perturbed copies are one pass over the weight (one read and
        one write of it, z in registers on CUDA): the paired forward's share of ZO2's fused pass.
        """
        p = self.params[name]
        if update is not None:
            target = self.masters.get(name, p.data)
            if self._can_fuse(name, target):
                plus = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                minus = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                self._philox_update(name, target, *update, pert=(self.seed(step, direction, name), eps, plus), minus=minus)
                self._sync_master(name)
                return plus, minus
            self.apply_update(*update, names=[name])
        value = self.value(name)
        if self.z_generator == "philox" and _kernel_ready(value) and p.dtype in _KERNEL_DTYPES:
            # One kernel pass writes both copies (z in registers on CUDA); they round exactly like
            # perturbed_value's. The weight itself is only read.
            self.weight_passes += 1
            self.z_generations += 1
            value = value.to(p.device)
            plus = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            minus = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            zo_ops(p.device).fused_update_perturb(
                value, [], [], 0.0, self.seed(step, direction, name), eps, plus, out_minus=minus, rademacher=self._rademacher
            )
            return plus, minus
        z = self.z(name, step, direction)
        self.weight_passes += 1  # the weight is read once for both copies
        if value.dtype in _HALF_DTYPES and value.dtype == p.dtype:
            plus, minus = _half_perturbed(value, z, (eps, -eps))
            return plus, minus
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
        seen: set[str] = set()

        def swap_in(module: nn.Module, owned: list[tuple[str, str]]) -> None:
            for _attr, name in owned:
                if name in originals:  # a tied parameter already swapped by its other owner
                    continue
                p = self.params[name]
                # A deferred update (ZO2) is applied to the stored tensor in place, so the original
                # kept here is the updated one.
                update = self.pending_update(name) if self.pending_update is not None else None
                originals[name] = p.data
                p.data = self.perturbed_value(name, step, direction, scale, update)
                seen.add(name)

        def swap_out(owned: list[tuple[str, str]]) -> None:
            for _attr, name in owned:
                if name in originals and name not in self._shared:
                    self.params[name].data = originals.pop(name)

        handles = []
        for module, owned in self._owners:
            handles.append(module.register_forward_pre_hook(lambda m, args, owned=owned: swap_in(m, owned)))
            handles.append(module.register_forward_hook(lambda m, args, out, owned=owned: swap_out(owned)))
        handles.append(self.model.register_forward_hook(lambda m, args, out: self.check_coverage(seen)))
        self._perturbing += 1
        try:
            yield
        finally:
            self._perturbing -= 1
            for h in handles:
                h.remove()
            for name, data in originals.items():
                self.params[name].data = data

    def check_coverage(self, perturbed: set[str]) -> None:
        """After the first perturbed forward of the whole model: every trained parameter was perturbed.

        A parameter read where no hook of :meth:`perturbed` sees it (a module that uses another module's
        weight directly, say) would never be perturbed, yet the update moves it along z every step: a random
        walk the loss never sees. Checked once; later forwards are the same code path.

        Raises:
            ZoftError: one line naming the parameters that were not perturbed.
        """
        if self._coverage_checked:
            return
        missing = [name for name in self.params if name not in perturbed]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ZoftError(
                f"zeroth-order training: {len(missing)} trained parameter(s) were not perturbed by the model's "
                f"forward ({shown}): they are read outside the forward of the module holding them, so their "
                "update would be a random walk; freeze them (requires_grad=False) or leave their module out of "
                "peft.target_modules"
            )
        self._coverage_checked = True

    @property
    def perturbing(self) -> bool:
        """Whether a :meth:`perturbed` context is open (its swap-in applies pending updates itself)."""
        return self._perturbing > 0

    # -- the update -----------------------------------------------------------------------------

    def round_to_storage(self, name: str, dtype: torch.dtype, rounding: str) -> None:
        """Round ``name``'s updated values to ``dtype``: a parameter stored in ``dtype`` but computed in a
        wider one (ZO2's AMP mode, :class:`zoft.zo.offload.BlockOffloader`). Drops its fp32 master."""
        self.masters.pop(name, None)
        self.rounding[name] = (dtype, rounding)

    def round_seed(self, step: int, name: str, group: int = 0) -> int:
        """The seed of the rounding bits of ``name`` after step ``step``'s update (:func:`rounding_seed`)."""
        return rounding_seed(self.run_seed, step, name, group)

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
        decay. The same call is used by training and by ``zoft replay``, so both round alike. With the
        philox generator the update runs through ``zo_ops(target.device)`` (``fused_update_perturb``
        without a perturbation: z is never materialized on CUDA). A parameter in :attr:`rounding` gets
        the update computed in fp32 and rounded to its dtype once (stochastically: seeded by
        :meth:`round_seed`); an fp32 parameter is updated in place in fp32.
        """
        names = list(names if names is not None else self.params)
        with self._prefetching(step, [(n, k) for n in names for k, c in coefficients if lr * c != 0.0]):
            for name in names:
                self._update_one(name, step, coefficients, lr, weight_decay)
        self._constrain()

    @contextlib.contextmanager
    def _prefetching(self, step: int, order: list[tuple[str, int]]) -> Iterator[None]:
        # torch.randn on CPU runs on one core: a worker thread draws the next tensor's z while this thread
        # applies the current one (the fp32 arithmetic and, for bf16/fp16, the rounding), so the update costs
        # about its z draws alone. The numbers do not change: each z has its own generator.
        use = self.z_generator == "torch" and self.device.type == "cpu" and len(order) > 2 and torch.get_num_threads() > 1
        if not use or self._prefetch is not None:
            yield
            return
        self._prefetch = _ZPrefetch(self, step, order)
        try:
            yield
        finally:
            self._prefetch.close()
            self._prefetch = None

    def _update_one(self, name: str, step: int, coefficients: list[tuple[int, float]], lr: float, weight_decay: float):
        p = self.params[name]
        target = self.masters.get(name, p.data)
        if self.z_generator == "philox":
            if self._philox_update(name, target, step, coefficients, lr, weight_decay):
                self._sync_master(name)
            return
        if name in self.rounding:
            self.rounded_update(name, step, coefficients, lr, weight_decay)
            return
        wd = 0.0 if _is_no_decay(name, p) else weight_decay
        if lr * wd != 0.0:
            target.mul_(1.0 - lr * wd)
            self.weight_passes += 1
        for direction, coef in coefficients:
            if lr * coef != 0.0:
                target.add_(self.z(name, step, direction), alpha=-lr * coef)
                self.weight_passes += 1
        self._sync_master(name)

    @torch.no_grad()
    def rounded_update(
        self,
        name: str,
        step: int,
        coefficients: list[tuple[int, float]],
        lr: float,
        weight_decay: float,
        dense: tuple[torch.Tensor, float] | None = None,
    ) -> bool:
        """``round(theta * (1 - lr wd) - c * dense - sum_k lr c_k z_k)`` in fp32, written back chunk by chunk.

        The plain-torch path of a parameter in :attr:`rounding` (torch z, or philox z of a tensor the
        kernels do not take). ``dense``: ``(tensor, c)``, a term subtracted before the z terms (Addax's
        first-order gradient). Torch z is materialized whole (its stream is not addressable by offset);
        philox z, the fp32 accumulator and the rounding bits one chunk at a time. One pass over the weight.
        Returns whether it was written (not when every term is zero: lr = 0 leaves it untouched).
        """
        p = self.params[name]
        dtype, rounding = self.rounding[name]
        wd_coef = lr * (0.0 if _is_no_decay(name, p) else weight_decay)
        terms = [(k, lr * c) for k, c in coefficients if lr * c != 0.0]
        if dense is not None and dense[1] == 0.0:
            dense = None
        if wd_coef == 0.0 and not terms and dense is None:
            return False
        target = p.data
        work = target if target.is_contiguous() else target.contiguous()
        flat = work.view(-1)
        dense_flat = None if dense is None else dense[0].detach().reshape(-1)
        if self.z_generator == "torch":
            zs = [self.z(name, step, k).view(-1) for k, _ in terms]

            def z_chunk(i: int, a: int, b: int) -> torch.Tensor:
                return zs[i][a:b]
        else:
            ops, seeds = zo_ops(work.device), [self.seed(step, k, name) for k, _ in terms]
            self.z_generations += len(terms)

            def z_chunk(i: int, a: int, b: int) -> torch.Tensor:
                zeros = torch.zeros(b - a, dtype=torch.float32, device=work.device)
                return ops.perturbed_copy(zeros, seeds[i], 1.0, zeros, offset=a, rademacher=self._rademacher)

        def compute(a: int, b: int, acc: torch.Tensor) -> torch.Tensor:
            acc.copy_(flat[a:b])
            if wd_coef != 0.0:
                acc.mul_(1.0 - wd_coef)
            if dense_flat is not None:
                acc.add_(dense_flat[a:b].float(), alpha=-dense[1])  # fp32 first: one vectorized add, as for z
            for i, (_, c) in enumerate(terms):
                acc.add_(z_chunk(i, a, b), alpha=-c)
            return acc

        bits = RoundingBits(self.round_seed(step, name), work.device, self.z_generator) if rounding == "stochastic" else None
        rounded_write_(work, compute, dtype, rounding, bits)
        if work is not target:
            target.copy_(work)
        self.weight_passes += 1
        return True

    def _sync_master(self, name: str) -> None:
        if name in self.masters:
            self.params[name].data.copy_(self.masters[name])
            self.weight_passes += 1

    def _philox_update(
        self,
        name: str,
        target: torch.Tensor,
        step: int,
        coefficients: list[tuple[int, float]],
        lr: float,
        weight_decay: float,
        pert: tuple[int, float, torch.Tensor] | None = None,
        minus: torch.Tensor | None = None,
    ) -> bool:
        """The update of ``target`` with philox z, optionally fused with a perturbed copy into ``pert[2]``.

        In fp32: ``target * (1 - lr * wd) - sum_k (lr * c_k) z_k``, the directions applied 4 per kernel
        call in order (the decay in the first call), the perturbation ``(seed, scale, out)`` in the last
        (and ``minus``, the ``-scale`` copy of the paired forward, from the same z). A parameter in
        :attr:`rounding` is rounded to its dtype at the end of each call (stochastically with the bits of
        ``round_seed(step, name, call)``), in the kernel. The fused and unfused calls round identically,
        so deferring and fusing never changes the bits. Returns whether ``target`` was written (not with
        lr = 0).
        """
        p = self.params[name]
        wd_coef = lr * (0.0 if _is_no_decay(name, p) else weight_decay)
        terms = [(self.seed(step, k, name), lr * c) for k, c in coefficients if lr * c != 0.0]
        rounding = None if name in self.masters else self.rounding.get(name)
        if not _kernel_ready(target):  # e.g. float64 or non-contiguous: materialize z, same order of terms
            if rounding is not None:
                return self.rounded_update(name, step, coefficients, lr, weight_decay)
            if wd_coef != 0.0:
                target.mul_(1.0 - wd_coef)
                self.weight_passes += 1
            for seed, c in terms:
                self.z_generations += 1
                target.add_(self._philox_z(seed, target.shape, target.device).to(target.dtype), alpha=-c)
                self.weight_passes += 1
            return wd_coef != 0.0 or bool(terms)
        ops = zo_ops(target.device)
        written = False
        n = _MAX_KERNEL_DIRECTIONS
        chunks = [terms[i:i + n] for i in range(0, len(terms), n)] or [[]]
        for i, chunk in enumerate(chunks):
            decay = wd_coef if i == 0 else 0.0
            out = pert if i == len(chunks) - 1 else None
            if not chunk and decay == 0.0 and out is None:
                continue  # nothing to do: no pass (lr = 0 leaves the weights untouched)
            written = written or bool(chunk) or decay != 0.0
            self.weight_passes += 1
            self.z_generations += len(chunk) + (out is not None)
            extra = {}
            if rounding is not None:
                extra["round_dtype"] = rounding[0]
                extra["round_seed"] = self.round_seed(step, name, i) if rounding[1] == "stochastic" else None
            ops.fused_update_perturb(
                target,
                [s for s, _ in chunk],
                [c for _, c in chunk],
                decay,
                None if out is None else out[0],
                0.0 if out is None else out[1],
                None if out is None else out[2],
                rademacher=self._rademacher,
                out_minus=minus if out is not None else None,
                **extra,
            )
        return written

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
