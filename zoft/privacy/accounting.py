"""Privacy accounting for DP-SGD / DPZero: epsilon from Opacus's RDP or PRV accountant.

A run of ``steps`` noised steps, each over a Poisson-sampled batch (rate q) with Gaussian noise of
multiplier sigma, is (epsilon, delta)-DP for the epsilon these functions return. The accountants are
Opacus's (RDP: Mironov et al. 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism",
https://arxiv.org/abs/1908.10530; PRV: Gopi et al. 2021, https://arxiv.org/abs/2106.02848). Opacus is
imported lazily; install it with ``pip install 'opacus>=1.5'`` (or ``pip install 'zoft[dp]'``).

Adjacency (what "one example" changing means) sets the sensitivity the noise is scaled to. Poisson
sampling goes with add/remove-one neighbours: the clipped sum moves by at most C. Fixed-size batches
(shuffling) keep N fixed, so neighbours differ by replacing one example: the sum moves by up to 2C and
the noise std doubles (:func:`sensitivity_factor`). The accountant then sees the same sigma.
"""

from __future__ import annotations

from zoft.errors import ZoftError

__all__ = ["epsilon_spent", "noise_for_target_epsilon", "sensitivity_factor", "ACCOUNTANTS", "ADJACENCIES"]

ACCOUNTANTS = ("rdp", "prv")
ADJACENCIES = ("add_remove", "replace_one")


def sensitivity_factor(adjacency: str) -> float:
    """How many bounds C one example can move a clipped sum: 1 for add/remove, 2 for replace-one.

    Args:
        adjacency: ``"add_remove"`` (Poisson sampling) or ``"replace_one"`` (fixed-size batches).

    Raises:
        ZoftError: an unknown adjacency.
    """
    if adjacency not in ADJACENCIES:
        raise ZoftError(f"privacy adjacency must be one of {', '.join(ADJACENCIES)}, got {adjacency!r}")
    # Replacing x by x' changes the sum by clip(g(x')) - clip(g(x)), whose norm reaches 2C.
    return 1.0 if adjacency == "add_remove" else 2.0


def _opacus_accountant(name: str):
    if name not in ACCOUNTANTS:
        raise ZoftError(f"privacy accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError as exc:
        raise ZoftError(
            "privacy accounting needs opacus, which is not installed; install it with: "
            "pip install 'opacus>=1.5'"
        ) from exc
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def _check(sample_rate: float, delta: float, steps: int) -> None:
    if not 0 < sample_rate <= 1:
        raise ZoftError(f"privacy: sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ZoftError(f"privacy: delta must be in (0, 1), got {delta}; a common choice is 1/N or smaller")
    if steps < 0:
        raise ZoftError(f"privacy: steps must be >= 0, got {steps}")


def epsilon_spent(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon after ``steps`` sampled Gaussian steps.

    Args:
        sample_rate: q, the Poisson sampling rate (expected batch size / data set size).
        noise_multiplier: sigma (noise std / L2 sensitivity).
        steps: noised optimizer steps taken.
        delta: the target delta.
        accountant: ``"rdp"`` (default) or ``"prv"`` (tighter, slower).

    Returns:
        Epsilon (0.0 after zero steps, ``inf`` with no noise).

    Raises:
        ZoftError: opacus missing, or arguments out of range.
    """
    _check(sample_rate, delta, steps)
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    acc = _opacus_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def noise_for_target_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to within the tolerance) whose epsilon after ``steps`` is <= target.

    Args:
        target_epsilon: epsilon to stay under.
        delta: the target delta.
        sample_rate: q, the Poisson sampling rate.
        steps: noised optimizer steps planned.
        accountant: ``"rdp"`` or ``"prv"``.
        epsilon_tolerance: the result's epsilon lies in ``[target - tolerance, target]``.

    Returns:
        sigma.

    Raises:
        ZoftError: opacus missing, the budget unreachable, or arguments out of range.
    """
    _check(sample_rate, delta, steps)
    if not target_epsilon > 0:
        raise ZoftError(f"privacy: target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ZoftError("privacy: noise_for_target_epsilon needs steps >= 1")
    _opacus_accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    except ValueError as exc:
        raise ZoftError(
            f"privacy: epsilon {target_epsilon} at delta {delta} is out of reach for {steps} steps at "
            f"sample rate {sample_rate} ({exc}); raise target_epsilon or lower steps/sample_rate"
        ) from exc
