"""Private training inside ``ZoftTrainer``: FlashDP for first-order steps, DPZero for zeroth-order ones.

This wires the components of :mod:`zoft.privacy` into HF's training loop. Papers: FlashDP
(https://arxiv.org/abs/2507.01154) clips each example's gradient per layer inside the backward; DPZero
(Zhang et al. 2023, https://arxiv.org/abs/2310.09639) clips each example's projected-gradient scalar.
Both add Gaussian noise once per optimizer step and are accounted with Opacus's RDP/PRV accountant for
the run's sample rate q, noise multiplier sigma and number of optimizer steps.

What one optimizer step does (a "logical batch" = ``per_device_train_batch_size * accumulation``):

- sampling: with ``poisson`` each example joins the logical batch with probability q; the batch is cut
  into ``accumulation`` micro-batches (some may be empty) and the sum is divided by ``q * N``, the
  expected size. Neighbouring data sets add or remove one example, which moves a clipped sum by at most
  C (sensitivity C). With ``shuffle`` HF's fixed batches are kept (last partial batch dropped) and the
  sum is divided by the actual size. Fixed-size batches keep N fixed, so neighbours replace one example
  and the sum moves by up to 2C: the noise std doubles (``2 sigma C``) for the same sigma. Accounting
  them with q = B/N is still an approximation, not a proven bound.
- FlashDP: each micro-batch's loss is the sum of per-example losses; the backward leaves the per-layer
  clipped sum in ``.grad``; before ``optimizer.step()`` noise ``N(0, (k sigma C)^2)`` is added (k = 1
  poisson, 2 shuffle) and the sum divided (``on_pre_optimizer_step``). HF's global ``max_grad_norm`` is off.
- DPZero: per-example losses at ``theta +- eps z`` give per-example scalars, clipped to [-C, C]; each of
  the n micro-batches adds noise of variance ``(k sigma C)^2 / n`` (their sum has the full variance) and
  divides by its share of the expected batch size, so the step's scalar is distributed exactly as one
  noised sum over the logical batch.

The guarantee covers the trained weights (and a ZO run's trajectory coefficients). Logged losses, the
trajectory's ``loss_plus``/``loss_minus`` and evaluation metrics are computed without noise.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from zoft.errors import ZoftError
from zoft.losses import verbalizer_scores
from zoft.privacy.accounting import epsilon_spent, noise_for_target_epsilon
from zoft.privacy.dpzero import dpzero_projected_grad
from zoft.privacy.flashdp import FlashDPHandle, PoissonBatchSampler, add_noise, attach_flashdp

__all__ = [
    "PrivacyConfig",
    "PrivacyEngine",
    "PrivacyCallback",
    "PoissonMicroBatchSampler",
    "per_sample_losses",
    "per_sample_losses_from_logits",
    "default_delta",
    "SHUFFLE_WARNING",
]

EMPTY_BATCH_KEY = "zoft_empty_batch"

SHUFFLE_WARNING = (
    "privacy.sampling 'shuffle': the noise is scaled to replace-one neighbours (2 x clip bound), and epsilon is "
    "computed as if batches were Poisson-sampled with q = B/N; for shuffled fixed-size batches this is an "
    "approximation, not a proven bound (use sampling 'poisson')"
)


@dataclass
class PrivacyConfig:
    """The recipe's ``privacy`` section as plain values (see ``zoft.config.PrivacySection``).

    Attributes:
        method: ``"flashdp"`` (first-order) or ``"dpzero"`` (zeroth-order).
        target_epsilon: epsilon to meet after the planned steps; or None when ``noise_multiplier`` is set.
        noise_multiplier: sigma as the accountant sees it; or None when ``target_epsilon`` is set.
        delta: delta; None means :func:`default_delta` of the training-set size.
        clip_bound: flashdp: total bound split over the trainable parameters; dpzero: the scalar bound.
        clip_bounds: flashdp: parameter name -> bound (instead of ``clip_bound``).
        sampling: ``"poisson"`` or ``"shuffle"``.
        accountant: ``"rdp"`` or ``"prv"``.
        path: flashdp linear-layer path: ``"auto"``, ``"explicit"`` or ``"ghost"``.
        seed: seed of the noise and of Poisson sampling. None (the default) draws it from the OS: a
            known seed lets anyone regenerate and subtract the noise, so fix it only for debugging.
    """

    method: str
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    clip_bound: float | None = None
    clip_bounds: dict[str, float] | None = None
    sampling: str = "poisson"
    accountant: str = "rdp"
    path: str = "auto"
    seed: int | None = None


def default_delta(num_samples: int) -> float:
    """``1 / N^1.1``: the default delta, a little below the usual ``1/N`` ceiling."""
    return 1.0 / float(num_samples) ** 1.1


def per_sample_losses(model, inputs: dict) -> torch.Tensor:
    """One loss per example, shape [B], each depending on that example alone.

    Verbalizer classification (``cls_labels``): the cross-entropy over the candidates' scores.
    Sequence classification (1-D ``labels``): cross-entropy of the logits. Causal LM: the mean of the
    example's token losses (positions with label -100 ignored), so an example's weight does not depend
    on the other examples' lengths as a batch-wide token mean would.

    Args:
        model: the (peft) model.
        inputs: a collated batch on the model's device.

    Returns:
        fp32 tensor [B].
    """
    if "cls_labels" in inputs:
        return F.cross_entropy(verbalizer_scores(model, inputs), inputs["cls_labels"], reduction="none")
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    return per_sample_losses_from_logits(model(**batch).logits, inputs["labels"])


def per_sample_losses_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`per_sample_losses` from a model's logits: 1-D labels take the cross-entropy of [B, C] logits;
    [B, T] labels (HF's unshifted causal-LM labels, -100 ignored) take each example's mean next-token loss.
    """
    logits = logits.float()
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    targets = labels[:, 1:]
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(1).clamp(min=1)
    return token.sum(1) / counts


class PoissonMicroBatchSampler:
    """Poisson logical batches (rate q), each cut into ``micro_batches`` consecutive index lists.

    HF's loop takes ``gradient_accumulation_steps`` consecutive batches per optimizer step, so with
    ``micro_batches`` equal to it every optimizer step sees exactly one Poisson sample. Lists may be
    empty; the trainer still takes the step (pure noise for an empty logical batch).

    Args:
        num_samples: N.
        sample_rate: q.
        micro_batches: pieces per logical batch (the accumulation steps).
        steps: logical batches per pass (default one expected epoch, ``round(1/q)``).
        generator: CPU generator of the membership draws.
    """

    def __init__(self, num_samples: int, sample_rate: float, micro_batches: int, steps: int | None = None,
                 generator: torch.Generator | None = None):
        self.logical = PoissonBatchSampler(num_samples, sample_rate, steps=steps, generator=generator)
        self.micro_batches = int(micro_batches)

    def __len__(self) -> int:
        return len(self.logical) * self.micro_batches

    def __iter__(self):
        for indices in self.logical:
            for piece in torch.tensor(indices, dtype=torch.long).tensor_split(self.micro_batches):
                yield piece.tolist()


class _EmptySafeCollator:
    """Collates an empty index list into a zero-row batch marked with ``EMPTY_BATCH_KEY``."""

    def __init__(self, collate, dataset):
        self.collate = collate
        self.dataset = dataset

    def __call__(self, rows):
        if rows:
            return self.collate(rows)
        # A real batch cut to zero rows keeps the keys HF inspects (labels, input_ids) consistent.
        template = self.collate([self.dataset[0]])
        empty = {k: (v[:0] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in template.items()}
        empty[EMPTY_BATCH_KEY] = torch.ones(())
        return empty


class PrivacyEngine:
    """The state of one private run: sampling, sigma, noise RNG, FlashDP handle, accounting.

    Args:
        config: the privacy settings.
        num_samples: N, the training-set size.
        micro_batch_size: ``per_device_train_batch_size``.
        accumulation: gradient-accumulation steps (micro-batches per optimizer step).
        n_directions: ZO directions per step (dpzero: each example's K scalars have L2 sensitivity
            ``C sqrt(K)``, so each direction gets noise ``sigma sqrt(K) C``).

    Raises:
        ZoftError: the logical batch is larger than the data set.
    """

    def __init__(self, config: PrivacyConfig, num_samples: int, micro_batch_size: int, accumulation: int,
                 n_directions: int = 1):
        self.config = config
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.accumulation = int(accumulation)
        self.n_directions = int(n_directions)
        logical = self.micro_batch_size * self.accumulation
        if logical > self.num_samples:
            raise ZoftError(
                f"privacy: the logical batch (per_device_train_batch_size x gradient_accumulation_steps = {logical}) "
                f"exceeds the {self.num_samples} training examples; lower the batch size"
            )
        self.sample_rate = logical / self.num_samples
        self.delta = config.delta if config.delta is not None else default_delta(self.num_samples)
        self.noise_multiplier: float | None = config.noise_multiplier
        self.seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.sampling_generator = torch.Generator().manual_seed(self.seed)
        self._noise_generators: dict[str, torch.Generator] = {}
        self.handle: FlashDPHandle | None = None
        self.planned_steps: int | None = None
        self._window_examples = 0
        self._epsilons: dict[tuple[int, float], float] = {}
        if config.sampling == "shuffle":
            warnings.warn(SHUFFLE_WARNING, stacklevel=2)

    # -- setup ----------------------------------------------------------------------------------

    @property
    def poisson(self) -> bool:
        return self.config.sampling == "poisson"

    @property
    def adjacency(self) -> str:
        """``add_remove`` under Poisson sampling; ``replace_one`` for fixed-size (shuffled) batches."""
        return "add_remove" if self.poisson else "replace_one"

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_samples

    def calibrate(self, planned_steps: int) -> float:
        """Fix sigma: the given one, or the smallest meeting ``target_epsilon`` after ``planned_steps``."""
        self.planned_steps = int(planned_steps)
        if self.config.target_epsilon is not None:
            self.noise_multiplier = noise_for_target_epsilon(
                self.config.target_epsilon, self.delta, self.sample_rate, self.planned_steps, self.config.accountant
            )
        return float(self.noise_multiplier)

    def attach(self, model) -> None:
        """Install FlashDP per-layer clipping on the model's trainable parameters (flashdp only)."""
        if self.config.method != "flashdp" or self.handle is not None:
            return
        if self.config.clip_bounds is not None:
            self.handle = attach_flashdp(model, self.config.clip_bounds, loss_reduction="sum", path=self.config.path)
        else:
            self.handle = attach_flashdp(
                model, total_bound=self.config.clip_bound, loss_reduction="sum", path=self.config.path
            )

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    def train_dataloader(self, dataset, collate, num_workers: int = 0):
        """A DataLoader of Poisson micro-batches (one expected epoch per pass)."""
        sampler = PoissonMicroBatchSampler(
            len(dataset), self.sample_rate, self.accumulation, generator=self.sampling_generator
        )
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollator(collate, dataset), num_workers=num_workers
        )

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._noise_generators:
            # One stream per device, all derived from the run's private seed.
            self._noise_generators[key] = torch.Generator(device=device).manual_seed(
                (self.seed + len(self._noise_generators) + 1) % 2**63
            )
        return self._noise_generators[key]

    # -- first-order (FlashDP) ------------------------------------------------------------------

    def flashdp_training_step(self, trainer, model, inputs) -> torch.Tensor:
        """Forward + backward of one micro-batch; the clipped per-example sum accumulates in ``.grad``."""
        model.train()
        inputs = trainer._prepare_inputs(inputs)
        n = trainer.current_gradient_accumulation_steps
        if EMPTY_BATCH_KEY in inputs:
            return torch.zeros((), device=trainer.args.device)
        if "candidate_mask" in inputs:
            raise ZoftError(
                "privacy.method 'flashdp' needs one-token verbalizer words (multi-token words put each example "
                "in several rows, which per-example clipping would treat as separate examples); choose "
                "data.verbalizers that are single tokens"
            )
        with trainer.compute_loss_context_manager():
            losses = per_sample_losses(model, inputs)
        self.count_examples(losses.numel())
        # The sum (not the mean): the clipped per-example gradients are summed, the noise added, then the
        # whole logical batch divided once in noise_step.
        trainer.accelerator.backward(losses.sum())
        return losses.detach().mean().to(trainer.args.device) / n

    def count_examples(self, n: int) -> None:
        """Count the examples of one micro-batch (fixed-size batches divide the noised sum by their total)."""
        self._window_examples += int(n)

    def noise_step(self) -> None:
        """Add the step's noise to the clipped sum and divide by the batch size (before optimizer.step)."""
        if self.handle is None:
            return
        params = self.handle.parameters()
        if self.poisson:
            divisor = self.expected_batch_size
        else:
            divisor = float(max(self._window_examples, 1))
        add_noise(
            params, self.noise_multiplier, self.handle, self._generator(params[0].device), divisor, self.adjacency
        )
        self._window_examples = 0

    # -- zeroth-order (DPZero) ------------------------------------------------------------------

    @torch.no_grad()
    def dpzero_training_step(self, trainer, model, inputs) -> torch.Tensor:
        """Both perturbed forwards of one micro-batch, per-example scalars clipped and noised, recorded."""
        from zoft.zo.estimate import DirectionEstimate

        inputs = trainer._prepare_inputs(inputs)
        n = trainer.current_gradient_accumulation_steps
        step = trainer.state.global_step
        eps = trainer.zo_config.eps
        empty = EMPTY_BATCH_KEY in inputs
        # Each of the n micro-batches of a step adds variance (k sigma_k C)^2 / n: their sum has the full one
        # (k = 2 for replace-one neighbours, inside dpzero_projected_grad).
        sigma_k = self.noise_multiplier * math.sqrt(self.n_directions) / math.sqrt(n)
        divisor = self.expected_batch_size / n if self.poisson else float(self.micro_batch_size)
        was_training = model.training
        model.eval()  # dropout off: both forwards must see the same function
        estimates = []
        try:
            for k in range(self.n_directions):
                if empty:
                    loss_plus = loss_minus = torch.zeros(0, device=trainer.args.device)
                else:
                    with trainer.zo_params.perturbed(step, k, +eps):
                        loss_plus = per_sample_losses(model, inputs)
                    with trainer.zo_params.perturbed(step, k, -eps):
                        loss_minus = per_sample_losses(model, inputs)
                g = dpzero_projected_grad(
                    loss_plus, loss_minus, eps, self.config.clip_bound, sigma_k,
                    generator=self._generator(loss_plus.device), expected_batch_size=divisor,
                    adjacency=self.adjacency,
                )
                lp = float(loss_plus.mean()) if not empty else 0.0
                lm = float(loss_minus.mean()) if not empty else 0.0
                estimates.append(DirectionEstimate(k, float(g), lp, lm))
        finally:
            model.train(was_training)
        weight = 1.0 / n
        for e in estimates:
            # weight 1/n undoes the 1/n in the divisor: the step's coefficient is the full noised sum / (q N).
            trainer.zo_optimizer.record(step, e, weight)
            trainer._zo_window.append((e.projected_grad, e.loss_plus, e.loss_minus))
        loss = sum((e.loss_plus + e.loss_minus) / 2 for e in estimates) / len(estimates)
        return torch.tensor(loss * weight, device=trainer.args.device)

    def training_step(self, trainer, model, inputs) -> torch.Tensor:
        if self.config.method == "flashdp":
            return self.flashdp_training_step(trainer, model, inputs)
        return self.dpzero_training_step(trainer, model, inputs)

    # -- accounting and reporting ---------------------------------------------------------------

    def epsilon(self, steps: int) -> float:
        """Epsilon spent after ``steps`` noised optimizer steps."""
        key = (int(steps), self.noise_multiplier)
        if key not in self._epsilons:  # the accountant takes a while with fractional orders; ask once per step
            self._epsilons[key] = epsilon_spent(
                self.sample_rate, self.noise_multiplier, int(steps), self.delta, self.config.accountant
            )
        return self._epsilons[key]

    def update_logs(self, logs: dict, steps: int) -> None:
        # The pre-noise gradient norm is a function of the private data without noise: never log it.
        logs.pop("grad_norm", None)
        if self.noise_multiplier is not None and ("loss" in logs or "train_loss" in logs):
            logs["dp_epsilon"] = self.epsilon(steps)

    def report(self, steps: int) -> dict:
        """What a run's metrics.json records under ``privacy``."""
        total = self.handle.total_bound if self.handle is not None else None
        if total is None and self.config.method == "flashdp":
            bounds = self.config.clip_bounds
            total = math.sqrt(sum(v * v for v in bounds.values())) if bounds else self.config.clip_bound
        return {
            "method": self.config.method,
            "epsilon": self.epsilon(steps),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": int(steps),
            "planned_steps": self.planned_steps,
            "target_epsilon": self.config.target_epsilon,
            "accountant": self.config.accountant,
            "sampling": self.config.sampling,
            "adjacency": self.adjacency,
            "clip_bound": total if self.config.method == "flashdp" else self.config.clip_bound,
            "proven_bound": self.poisson,
        }


class PrivacyCallback(TrainerCallback):
    """Calibrates sigma and attaches FlashDP at train begin, noises each optimizer step, detaches at the end."""

    def __init__(self, engine: PrivacyEngine):
        self.engine = engine

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.world_size > 1:
            raise ZoftError("privacy: multi-process training is not supported with privacy yet; run on one process")
        self.engine.calibrate(state.max_steps)
        self.engine.attach(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.engine.noise_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.engine.detach()
