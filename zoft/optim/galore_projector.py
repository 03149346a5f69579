"""GaLore's low-rank gradient projector: keep a weight's gradient in the span of its top-r singular vectors.

GaLore ("GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", Zhao et al., 2024,
https://arxiv.org/abs/2403.03507) takes the SVD of a weight matrix's gradient every T steps and keeps the
top-r singular vectors of the *smaller* side as an orthonormal basis P. The optimizer then runs on the
projected gradient (r x n or m x r instead of m x n), which is what shrinks Adam's two moments, and maps its
update back with P, times a scale. The side rule is galore-torch's ``proj_type="std"``: a matrix with at
least as many rows as columns (m >= n) is projected from the right (``G @ Q.T``, Q = top-r rows of V^T,
shape r x n); a wide one (m < n) from the left (``P.T @ G``, P = top-r columns of U, shape m x r).

Everything here is a plain function of tensors so the optimizer can keep P in its state dict as a tensor
(checkpoints then load with ``torch.load(weights_only=True)``); :class:`GaLoreProjector` bundles them for
standalone use.
"""

from __future__ import annotations

from typing import Literal

import torch

Side = Literal["left", "right"]


def projection_side(shape: torch.Size | tuple[int, ...]) -> Side:
    """Return which side GaLore projects a matrix of this shape from (the smaller side is kept).

    Args:
        shape: The (rows, cols) shape of the weight / gradient.

    Returns:
        ``"right"`` when rows >= cols (projected gradient is rows x r), else ``"left"`` (r x cols).
    """
    return "right" if shape[0] >= shape[1] else "left"


def compute_projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """SVD the gradient and return the orthonormal basis of its top-``rank`` singular subspace.

    The SVD runs in float32 (as galore-torch does) and the basis is returned in the gradient's dtype.
    A rank above min(rows, cols) is clamped: the projection is then a full-rank rotation.

    Args:
        grad: A 2-D gradient, shape (m, n).
        rank: Number of singular vectors to keep.

    Returns:
        For the right side, Q of shape (r, n) with orthonormal rows; for the left side, P of shape (m, r)
        with orthonormal columns.
    """
    u, _, vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
    if projection_side(grad.shape) == "right":
        basis = vh[:rank, :]
    else:
        basis = u[:, :rank]
    return basis.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Map a full gradient (m, n) into the low-rank coordinates of ``basis``."""
    if projection_side(grad.shape) == "right":
        return grad @ basis.t()
    return basis.t() @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, side: Side, scale: float) -> torch.Tensor:
    """Map low-rank coordinates back to the full (m, n) shape and multiply by GaLore's ``scale``.

    Args:
        low: Low-rank tensor, (m, r) for the right side or (r, n) for the left side.
        basis: The basis returned by :func:`compute_projection`.
        side: The side the basis belongs to (see :func:`projection_side` of the full shape).
        scale: GaLore's alpha; the update is multiplied by it (0.25 in the paper's fine-tuning runs).

    Returns:
        The full-size tensor.
    """
    full = low @ basis if side == "right" else basis @ low
    return full * scale


def change_of_basis(old: torch.Tensor, new: torch.Tensor, side: Side) -> torch.Tensor:
    """The r x r matrix that re-expresses coordinates in the old subspace in the new one.

    For the left side a projected tensor X lives as P_old X in full space, and its coordinates in the new
    basis are P_new^T P_old X, so R = P_new^T P_old (apply as ``R @ X``). For the right side X lives as
    X Q_old, new coordinates X Q_old Q_new^T, so R = Q_old Q_new^T (apply as ``X @ R``). What lies outside
    the new subspace is dropped, which is the best a rank-r state can keep.

    Args:
        old: Basis before the refresh.
        new: Basis after the refresh (same shape as ``old``).
        side: Which side both bases project from.

    Returns:
        R, of shape (r_new, r_old) for the left side and (r_old, r_new) for the right side.
    """
    return new.t() @ old if side == "left" else old @ new.t()


def apply_change_of_basis(low: torch.Tensor, r: torch.Tensor, side: Side) -> torch.Tensor:
    """Apply a matrix from :func:`change_of_basis` to projected coordinates (``R @ X`` or ``X @ R``).

    ``low`` may carry leading batch dimensions (e.g. a stack of projected gradients).
    """
    return r @ low if side == "left" else low @ r


class GaLoreProjector:
    """Stateful convenience wrapper: refresh the basis every ``update_proj_gap`` steps, project, project back.

    Args:
        rank: Rank r of the projection (GaLore's default 128; at most min(m, n) is used).
        update_proj_gap: T, the number of steps between SVD refreshes (GaLore's default 200).
        scale: Multiplier on the update mapped back to full size (GaLore's alpha, 0.25 for fine-tuning).
    """

    def __init__(self, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25):
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.basis: torch.Tensor | None = None
        self.side: Side | None = None

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """Project ``grad``, first recomputing the basis when ``step % update_proj_gap == 0``.

        ``step`` counts completed optimizer steps (0 on the first call), as in galore-torch.
        """
        if self.basis is None or step % self.update_proj_gap == 0:
            self.basis = compute_projection(grad, self.rank)
            self.side = projection_side(grad.shape)
        return project(grad, self.basis)

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        """Map low-rank coordinates back to full size, times ``scale``."""
        if self.basis is None or self.side is None:
            raise RuntimeError("project() must be called before project_back()")
        return project_back(low, self.basis, self.side, self.scale)
