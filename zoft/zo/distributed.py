"""DistZO2: zeroth-order fine-tuning over several processes, exchanging only scalars.

Paper: "DistZO2: High-Throughput and Memory-Efficient Zeroth-Order Fine-tuning LLMs with Distributed
Parallel Computing" (2025), https://arxiv.org/abs/2507.03211. Perturbation parallelism (PertP) runs
the +eps and -eps forwards of a direction on two ranks; data parallelism (DP) splits the batch; both
compose (2D: world = perturbation_parallel x data_parallel). Every rank derives the same z from the
shared seed (``zoft.zo.perturb.derive_seed``) and applies the same update, so parameters stay
identical with no tensor communication: per direction, one all-gather of one float64 loss per rank.
A periodic checksum of the trained weights catches divergence. Saves wall time, not memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zoft.errors import ZoftError
from zoft.zo.estimate import DirectionEstimate
from zoft.zo.paired import paired_perturbation
from zoft.zo.perturb import ZOParameters


@dataclass
class DistZOConfig:
    """The layout (the recipe's ``distributed`` section, as plain values).

    Attributes:
        perturbation_parallel: 2: the +eps and -eps forwards on two ranks; 1: both on every rank.
        data_parallel: ranks splitting the batch; ``None``: world size / perturbation_parallel.
        checksum_steps: compare a float64 checksum of the trained weights every N steps (0: never).
    """

    perturbation_parallel: int = 1
    data_parallel: int | None = None
    checksum_steps: int = 50


def resolve_layout(config: DistZOConfig, world_size: int) -> tuple[int, int]:
    """(perturbation_parallel, data_parallel) for ``world_size`` processes.

    Raises:
        ZoftError: PertP with an odd number of processes, or a layout whose product is not the world size.
    """
    pp = config.perturbation_parallel
    if pp not in (1, 2):
        raise ZoftError(f"distributed.perturbation_parallel: must be 1 or 2, got {pp}")
    if pp == 2 and world_size % 2:
        raise ZoftError(
            f"distributed.perturbation_parallel: 2 needs an even number of processes, got {world_size}; "
            "launch an even --nproc_per_node or set perturbation_parallel: 1"
        )
    dp = config.data_parallel if config.data_parallel is not None else world_size // pp
    if pp * dp != world_size:
        raise ZoftError(
            f"distributed: perturbation_parallel {pp} x data_parallel {dp} = {pp * dp} does not match the "
            f"{world_size} processes launched; set data_parallel to {world_size // pp} or launch {pp * dp} processes"
        )
    return pp, dp


class DistZO:
    """PertP x DP over the default ``torch.distributed`` process group.

    Rank ``r`` is data-parallel index ``r // pp`` and perturbation index ``r % pp`` (0: +eps, 1: -eps).
    The ranks of one data-parallel index must see the same batch (:class:`PertPSampler` does that
    with HF Trainer); the data-parallel indices see disjoint shards of equal size.

    Args:
        config: the layout.
        world_size, rank: default: from the initialized process group (1 and 0 without one).
    """

    def __init__(self, config: DistZOConfig, world_size: int | None = None, rank: int | None = None) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.pp, self.dp = resolve_layout(config, self.world_size)
        self.dp_index, self.pert_index = divmod(self.rank, self.pp)
        self.checksum_steps = config.checksum_steps
        self.scalars_sent = 0  # floats this rank contributed to collectives (cost accounting)

    def _all_gather(self, values: list[float]) -> torch.Tensor:
        """[world, len(values)] float64: every rank's values."""
        mine = torch.tensor(values, dtype=torch.float64)
        self.scalars_sent += len(values)
        if self.world_size == 1:
            return mine.unsqueeze(0)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return torch.stack(out)

    @torch.no_grad()
    def spsa(
        self,
        zo: ZOParameters,
        loss_fn: Callable[[], torch.Tensor],
        step: int,
        eps: float,
        n_directions: int = 1,
    ) -> list[DirectionEstimate]:
        """The distributed counterpart of :func:`zoft.zo.estimate.spsa`; every rank returns the same list.

        Per direction: PertP ranks run one perturbed forward each (+eps or -eps), others both; one
        all-gather of the losses; the projected gradient is the mean over data-parallel indices of
        ``(L+ - L-) / 2eps``, and the reported losses are their means likewise.
        """
        if self.checksum_steps and step % self.checksum_steps == 0:
            self.check_in_sync(zo, step)
        estimates = []
        for k in range(n_directions):
            if self.pp == 2:
                sign = 1.0 if self.pert_index == 0 else -1.0
                with zo.perturbed(step, k, sign * eps):
                    mine = [float(loss_fn())]
            else:
                with zo.perturbed(step, k, +eps):
                    plus = float(loss_fn())
                with zo.perturbed(step, k, -eps):
                    minus = float(loss_fn())
                mine = [plus, minus]
            estimates.append(self._combine(k, mine, eps))
        return estimates

    @torch.no_grad()
    def paired_spsa(
        self,
        zo: ZOParameters,
        pair_loss_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        step: int,
        eps: float,
        n_directions: int = 1,
        seq_len: int | None = None,
    ) -> list[DirectionEstimate]:
        """The distributed counterpart of :func:`zoft.zo.estimate.paired_spsa` (data parallelism only).

        Each rank runs one forward of its doubled shard per direction and contributes (L+, L-) to the
        same all-gather as :meth:`spsa`, so the estimates equal those of :meth:`spsa` with
        ``perturbation_parallel`` 1.

        Raises:
            ValueError: with ``perturbation_parallel`` 2, whose ranks each run one sign already.
        """
        if self.pp != 1:
            raise ValueError("paired_spsa needs perturbation_parallel 1: PertP runs +eps and -eps on two ranks")
        if self.checksum_steps and step % self.checksum_steps == 0:
            self.check_in_sync(zo, step)
        estimates = []
        for k in range(n_directions):
            with paired_perturbation(zo, step, k, eps, batch_size, seq_len):
                mine = [float(v) for v in pair_loss_fn()]
            estimates.append(self._combine(k, mine, eps))
        return estimates

    def _combine(self, k: int, mine: list[float], eps: float) -> DirectionEstimate:
        # One all-gather of this rank's loss(es) for direction k; every rank forms the same estimate.
        gathered = self._all_gather(mine).view(self.dp, -1).tolist()  # rows: dp index
        pairs = [(row[0], row[1]) for row in gathered]
        # Summed in rank order on every rank: identical floats everywhere.
        grads = [(lp - lm) / (2.0 * eps) for lp, lm in pairs]
        g = math.fsum(grads) / self.dp
        lp = math.fsum(p for p, _ in pairs) / self.dp
        lm = math.fsum(m for _, m in pairs) / self.dp
        return DirectionEstimate(k, g, lp, lm)

    @torch.no_grad()
    def checksum(self, zo: ZOParameters) -> float:
        """A float64 sum over the trained parameters' exact values, weighted by position so that a
        swap or sign error still changes it."""
        total = 0.0
        for name in sorted(zo.params):
            v = zo.value(name).detach().to(torch.float64).flatten()
            w = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device).remainder_(97).add_(1)
            total += float((v * w).sum())
        return total

    def check_in_sync(self, zo: ZOParameters, step: int) -> None:
        """All-gather the checksum; raise on every rank if any rank's weights differ.

        Raises:
            RuntimeError: the ranks' trained parameters are no longer identical.
        """
        sums = self._all_gather([self.checksum(zo)])[:, 0].tolist()
        if len(set(sums)) > 1:
            raise RuntimeError(
                f"DistZO2: trained parameters diverged across ranks at step {step} (checksums by rank: "
                f"{sums}); every rank must load the same weights and use the same seed"
            )


class PertPSampler(torch.utils.data.Sampler):
    """Yields each chunk of ``batch_size`` indices ``repeats`` times in a row, optionally sharded.

    accelerate shards a DataLoader's batches round-robin over ranks (batch i to rank i mod world);
    with each batch repeated ``perturbation_parallel`` times, ranks ``d*pp .. d*pp+pp-1`` receive
    the same batch and data-parallel index d the d-th batch of each group, as :class:`DistZO` needs.
    Where nothing shards the loader (HF Trainer under torchrun on CPU runs each rank as a single
    process), ``shard=(rank, world_size)`` applies the same round-robin here. The order is a seeded
    permutation (``seed + epoch``), identical on every rank.

    Args:
        n: dataset length.
        batch_size: per-device batch size.
        repeats: perturbation_parallel.
        seed: the run seed.
        shuffle: permute the indices each epoch.
        shard: ``(rank, world_size)`` to keep only this rank's batches; ``None``: all batches.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        repeats: int,
        seed: int,
        shuffle: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.n, self.batch_size, self.repeats, self.seed, self.shuffle = n, batch_size, repeats, seed, shuffle
        self.rank, self.world = shard if shard is not None else (0, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _n_batches(self) -> int:
        return (self.n // self.batch_size) * self.repeats // self.world

    def __len__(self) -> int:
        return self._n_batches() * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        # A last, short chunk would shift the batch boundaries of the repeats: dropped (like drop_last).
        batches = [
            order[start : start + self.batch_size]
            for start in range(0, self.n - self.batch_size + 1, self.batch_size)
            for _ in range(self.repeats)
        ]
        for batch in batches[self.rank :: self.world][: self._n_batches()]:
            yield from batch
