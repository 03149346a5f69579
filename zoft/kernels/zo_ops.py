"""Pick the z perturb/update backend for a device: the Triton kernels on CUDA, plain torch elsewhere.

Both backends compute the same z (Philox4x32-10 keyed by a 63-bit seed, see ``zo_reference``) and the
same fp32 arithmetic; they agree bit for bit on the Philox words and Rademacher directions and to a
few ulp on Gaussian z (the GPU's log/sin/cos are not correctly rounded). A run must use one backend
for the +eps, -eps and update of a step; ``zo_ops`` picks it from the device, and the environment
variable ``ZOFT_ZO_KERNEL=torch|triton`` forces one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ZoftError
from . import zo_reference

ENV_VAR = "ZOFT_ZO_KERNEL"


@dataclass(frozen=True)
class ZoOps:
    """The three z operations of one backend (same signatures in both; see ``zo_reference``).

    Attributes:
        backend: ``"triton"`` or ``"torch"``.
        perturbed_copy: ``(w, seed, eps, out=None, *, offset=0, rademacher=False) -> out``.
        fused_update_perturb: ``(w, upd_seeds, upd_coefs, wd_coef=0.0, pert_seed=None, pert_eps=0.0,
            out=None, *, offset=0, rademacher=False) -> w``.
        axpy_z_: ``(w, seed, coef, *, offset=0, rademacher=False) -> w``.
        philox_z: ``(seed, numel, device=None, *, offset=0, rademacher=False) -> fp32 z`` (always the
            torch reference; materializes z, for checks and replay).
    """

    backend: str
    perturbed_copy: Callable[..., torch.Tensor]
    fused_update_perturb: Callable[..., torch.Tensor]
    axpy_z_: Callable[..., torch.Tensor]
    philox_z: Callable[..., torch.Tensor]


def _torch_ops() -> ZoOps:
    r = zo_reference
    return ZoOps("torch", r.perturbed_copy, r.fused_update_perturb, r.axpy_z_, r.philox_z)


def _triton_ops() -> ZoOps | None:
    try:
        from . import zo_triton as t
    except ImportError:
        return None
    return ZoOps("triton", t.perturbed_copy, t.fused_update_perturb, t.axpy_z_, zo_reference.philox_z)


def zo_ops(device: torch.device | str) -> ZoOps:
    """The z operations to use for weights on ``device``.

    Triton on CUDA when triton imports, torch otherwise; ``ZOFT_ZO_KERNEL=torch`` or ``=triton``
    overrides (``triton`` on a CPU device needs ``TRITON_INTERPRET=1``, which runs the kernels slowly
    on CPU and is meant for tests).

    Args:
        device: the device of the weights the ops will touch.

    Returns:
        A ``ZoOps``.

    Raises:
        ZoftError: ``ZOFT_ZO_KERNEL`` has another value, or forces triton where it cannot run.
    """
    device = torch.device(device)
    choice = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ZoftError(f"{ENV_VAR}={choice!r} is not one of torch, triton; unset it to pick by device")
    if choice == "torch":
        return _torch_ops()
    ops = _triton_ops()
    if choice == "triton":
        if ops is None:
            raise ZoftError(f"{ENV_VAR}=triton but triton does not import; pip install 'zoft[triton]' or unset it")
        interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if device.type != "cuda" and not interpreting:
            raise ZoftError(
                f"{ENV_VAR}=triton but the weights are on {device}; the kernels need CUDA "
                "(or TRITON_INTERPRET=1 for a slow CPU check)"
            )
        return ops
    if device.type == "cuda" and ops is not None:
        return ops
    return _torch_ops()
