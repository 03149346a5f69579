"""ZoftTrainer: HF ``Trainer`` with a zeroth-order step, without copying HF's training loop.

Only public override points are used: ``training_step`` (the ZO step: perturbed forwards, no
backward), ``create_optimizer`` (the ZO update sits in HF's optimizer slot, so schedulers,
logging, checkpointing, gradient accumulation and ``resume_from_checkpoint`` work unchanged),
``compute_loss`` / ``prediction_step`` (verbalizer classification) and ``train`` / ``evaluate`` /
``save_model`` (pending updates are applied first; DistZO2 models are prepared without DDP).
With ``zo=None`` it is HF's Trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import Trainer

from zoft.checkpoints import CompleteCheckpointMarker
from zoft.errors import ZoftError
from zoft.losses import (
    verbalizer_forward_kwargs,
    verbalizer_loss,
    verbalizer_scores,
    verbalizer_scores_from_logits,
)
from zoft.metrics import ZoftMetricsCallback
from zoft.zo.estimate import paired_spsa, spsa
from zoft.zo.mezo import MeZOConfig, MeZOOptimizer
from zoft.zo.paired import double_batch
from zoft.zo.perturb import ZOParameters
from zoft.zo.trajectory import TrajectoryWriter, trajectory_header

if TYPE_CHECKING:
    from zoft.privacy.trainer_dp import PrivacyConfig, PrivacyEngine


_BYPASS_DEVICE_MAP = "ACCELERATE_BYPASS_DEVICE_MAP"


def classification_accuracy(eval_pred) -> dict[str, float]:
    scores, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(scores, tuple):
        scores = scores[0]
    return {"accuracy": float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean())}


class ZoftTrainer(Trainer):
    """A drop-in ``transformers.Trainer`` that trains with MeZO when ``zo`` is given.

    Args:
        zo: zeroth-order settings (:class:`zoft.zo.mezo.MeZOConfig`); ``None`` for first-order.
        trajectory_path: where to log (step, seed, projected gradient, lr); ``None`` to skip.
        privacy: differential privacy (:class:`zoft.privacy.trainer_dp.PrivacyConfig`): FlashDP with a
            first-order optimizer, DPZero with ``zo``; ``None`` for ordinary training.
        *args, **kwargs: as for ``transformers.Trainer``. Batches with ``cls_labels`` (from
            :class:`zoft.data.collate.VerbalizerCollator`) are scored by verbalizer words.
    """

    def __init__(
        self,
        *args,
        zo: MeZOConfig | None = None,
        trajectory_path: str | None = None,
        privacy: PrivacyConfig | None = None,
        offloader=None,
        distributed=None,
        **kwargs,
    ):
        self.addax_config = kwargs.pop("addax", None)  # zoft.zo.addax.AddaxConfig (needs zo too)
        self.zo_config = zo
        # ZO2 (zoft.zo.offload.BlockOffloader) and DistZO2 (zoft.zo.distributed.DistZOConfig); None: off.
        self.offloader = offloader
        self.zo_distributed = distributed
        self.trajectory_path = trajectory_path
        self._trajectory: TrajectoryWriter | None = None
        self._zo_window: list[tuple[float, float, float]] = []
        self.zo_params: ZOParameters | None = None
        super().__init__(*args, **kwargs)
        if self.addax_config is not None and self.args.fp16:
            from zoft.zo.addax import FP16_REFUSAL

            raise ZoftError(FP16_REFUSAL)
        self.add_callback(CompleteCheckpointMarker())
        # tokens/s and peak memory in every training log (zoft/metrics.py; reported through report_to)
        self.zoft_metrics = ZoftMetricsCallback()
        self.add_callback(self.zoft_metrics)
        # -- privacy (issue 8): all logic lives in zoft/privacy/trainer_dp.py
        self.dp: PrivacyEngine | None = None
        if privacy is not None:
            from zoft.privacy.trainer_dp import PrivacyCallback, PrivacyEngine

            self.dp = PrivacyEngine(
                privacy,
                num_samples=len(self.train_dataset),
                micro_batch_size=self.args.per_device_train_batch_size,
                accumulation=self.args.gradient_accumulation_steps,
                n_directions=zo.n_directions if zo is not None else 1,
            )
            self.add_callback(PrivacyCallback(self.dp))

    # -- optimizer slot -------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.zo_config is None:
            return super().create_optimizer(model)
        self._without_loss_scaling()
        if self.optimizer is None:
            cfg = self.zo_config
            seed = self.args.seed if cfg.seed is None else cfg.seed
            self.zo_params = ZOParameters(
                self.model,
                seed,
                distribution=cfg.distribution,
                master_weights=cfg.master_weights,
                z_generator=cfg.z_generator,
                # ZO2: the blocks are stored on CPU but computed (and perturbed) on the offloader's device.
                compute_device=self.offloader.device if self.offloader is not None else None,
            )
            opt_cls, extra = MeZOOptimizer, {}
            if self.offloader is not None:  # ZO2: the update is applied while each block is resident
                from zoft.zo.offload import DeferredMeZOOptimizer

                opt_cls, extra = DeferredMeZOOptimizer, {"offloader": self.offloader}
            self.optimizer = opt_cls(
                self.zo_params,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                n_directions=cfg.n_directions,
                on_update=self._log_update,
                clip=cfg.clip_projected_grad,
                **extra,
            )
        return self.optimizer

    def _without_loss_scaling(self) -> None:
        """ZO with ``train.fp16``: the forwards run under fp16 autocast, and nothing is loss-scaled.

        accelerate pairs fp16 autocast with a GradScaler (on CUDA). A ZO step has no backward, so that scaler
        never sees a scaled loss and its ``step`` fails ("_scale is None"); scaling is pointless anyway, as
        the projected gradient is a difference of two losses. A disabled scaler (called before accelerate
        wraps the optimizer) keeps accelerate's step, clipping and checkpoint paths and scales nothing.
        """
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self.accelerator.scaler = torch.amp.GradScaler(self.accelerator.device.type, enabled=False)

    @property
    def zo_optimizer(self) -> MeZOOptimizer | None:
        opt = self.optimizer
        opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
        return opt if isinstance(opt, MeZOOptimizer) else None

    # -- the ZO step ----------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.zoft_metrics.count_tokens(inputs)
        if self.dp is not None:
            return self.dp.training_step(self, model, inputs)
        if self.zo_config is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.addax_config is not None:
            return self._addax_training_step(model, inputs)
        inputs = self._prepare_inputs(inputs)
        was_training = model.training
        model.eval()  # dropout off: both forwards must see the same function
        cfg, dzo = self.zo_config, self.zo_distributed
        try:
            if cfg.paired_forward:  # one forward of [x; x]: +eps on the first half, -eps on the second
                rows, seq_len = self._model_batch_shape(inputs)
                estimates = (dzo.paired_spsa if dzo is not None else paired_spsa)(
                    self.zo_params,
                    lambda: self.compute_paired_losses(model, inputs),
                    batch_size=rows,
                    seq_len=seq_len,
                    step=self.state.global_step,
                    eps=cfg.eps,
                    n_directions=cfg.n_directions,
                )
            else:
                estimates = (dzo.spsa if dzo is not None else spsa)(
                    self.zo_params,
                    lambda: self.compute_loss(model, inputs),
                    step=self.state.global_step,
                    eps=cfg.eps,
                    n_directions=cfg.n_directions,
                )
        finally:
            model.train(was_training)
        weight = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        for e in estimates:
            self.zo_optimizer.record(self.state.global_step, e, weight)
            self._zo_window.append((e.projected_grad, e.loss_plus, e.loss_minus))
        loss = sum((e.loss_plus + e.loss_minus) / 2 for e in estimates) / len(estimates)
        return torch.tensor(loss * weight, device=self.args.device)

    def _get_train_sampler(self, *args, **kwargs):
        d = self.zo_distributed
        if d is not None and d.world_size > 1:
            # PertP: the +eps and -eps ranks of a data-parallel index must see the same batch; DP
            # indices disjoint shards. accelerate shards round-robin when it runs distributed (GPU);
            # under torchrun on CPU it runs each rank alone, and the sampler shards itself.
            from zoft.zo.distributed import PertPSampler

            shard = None if self.accelerator.num_processes == d.world_size else (d.rank, d.world_size)
            return PertPSampler(
                len(self.train_dataset), self.args.per_device_train_batch_size, d.pp, self.args.seed, shard=shard
            )
        return super()._get_train_sampler(*args, **kwargs)

    def get_train_dataloader(self):
        if self.dp is not None and self.dp.poisson:  # DP-SGD's Poisson sampling (zoft/privacy)
            return self.dp.train_dataloader(self.train_dataset, self.data_collator, self.args.dataloader_num_workers)
        if self.addax_config is None:
            return super().get_train_dataloader()
        return self._addax_train_dataloader()

    # -- Addax (zoft/zo/addax.py): two loaders, ZO on long + in-place SGD on short sequences ----------

    def _addax_train_dataloader(self):
        from zoft.zo.addax import AddaxLoader, split_by_length

        cfg = self.addax_config
        full = self.train_dataset
        long, short = split_by_length([len(x) for x in full["input_ids"]], cfg.length_threshold)
        loaders = []
        for indices, batch_size, weight in ((long, cfg.zo_batch_size, cfg.alpha), (short, cfg.fo_batch_size,
                                                                                  1 - cfg.alpha)):
            if not indices or weight == 0:
                loaders.append(None)
                continue
            # HF's own loader construction (sampler, seeding, accelerate) on each side's rows.
            self.train_dataset, saved_bs = full.select(indices), self._train_batch_size
            self._train_batch_size = batch_size
            try:
                loaders.append(super().get_train_dataloader())
            finally:
                self.train_dataset, self._train_batch_size = full, saved_bs
        return AddaxLoader(*loaders)

    def _addax_training_step(self, model, inputs):
        from zoft.zo.addax import addax_step

        long, short = (None if inputs[k] is None else self._prepare_inputs(inputs[k]) for k in ("zo", "fo"))

        def zo_loss():
            was_training = model.training
            model.eval()  # dropout off: both forwards must see the same function
            try:
                return self.compute_loss(model, long)
            finally:
                model.train(was_training)

        def fo_backward():
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, short)
            self.accelerator.backward(loss)
            return loss.detach()

        cfg, group = self.zo_config, self.zo_optimizer.param_groups[0]
        result = addax_step(
            self.zo_params,
            step=self.state.global_step,
            lr=float(group["lr"]),
            alpha=self.addax_config.alpha,
            eps=cfg.eps,
            zo_loss=zo_loss if long is not None else None,
            fo_backward=fo_backward if short is not None else None,
            weight_decay=float(group["weight_decay"]),
            n_directions=cfg.n_directions,
        )
        for e in result.estimates:
            self._zo_window.append((e.projected_grad, e.loss_plus, e.loss_minus))
        losses = [(e.loss_plus + e.loss_minus) / 2 for e in result.estimates]
        losses += [result.fo_loss] if result.fo_loss is not None else []
        return torch.tensor(sum(losses) / max(len(losses), 1), device=self.args.device)

    # -- end Addax ----------------------------------------------------------------------------------

    def _log_update(self, record: dict) -> None:
        if self._trajectory is not None and self.is_world_process_zero():
            self._trajectory.append(record)

    # -- losses ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "cls_labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scores = verbalizer_scores(model, inputs)
        loss = verbalizer_loss(scores, inputs["cls_labels"])
        return (loss, {"scores": scores}) if return_outputs else loss

    @staticmethod
    def _model_batch_shape(inputs) -> tuple[int, int | None]:
        """(rows, tokens per row) of the batch as the model sees it (verbalizer: one row per candidate)."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise ZoftError("method.paired_forward: the batch has no input_ids to double; set it to false")
        return ids.shape[0], ids.shape[1] if ids.ndim > 1 else None

    def compute_paired_losses(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(L+, L-) from one forward of the doubled batch ``[x; x]`` inside
        :func:`zoft.zo.paired.paired_perturbation`.

        Each is the loss of its half computed as :meth:`compute_loss` computes it on ``x`` (verbalizer
        cross-entropy, or the model's own causal-LM loss: the mean over the non-ignored shifted tokens of
        that half), never one loss over all 2B rows. Labels are not doubled: the model is called without
        them and each half's logits meet the undoubled labels.
        """
        rows, _ = self._model_batch_shape(inputs)
        if "cls_labels" in inputs:
            logits = model(**double_batch(verbalizer_forward_kwargs(inputs), rows)).logits
            return tuple(
                verbalizer_loss(verbalizer_scores_from_logits(half, inputs), inputs["cls_labels"])
                for half in (logits[:rows], logits[rows:])
            )
        labels = inputs.get("labels")
        if labels is None or labels.shape != inputs["input_ids"].shape or self.compute_loss_func is not None:
            raise ZoftError(
                "method.paired_forward: supported for causal-LM batches (labels shaped like input_ids, no custom "
                "compute_loss_func) and verbalizer classification; set it to false"
            )
        logits = model(**double_batch({k: v for k, v in inputs.items() if k != "labels"}, rows)).logits
        return tuple(self._causal_lm_loss(model, half, labels) for half in (logits[:rows], logits[rows:]))

    def _causal_lm_loss(self, model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # What HF's compute_loss gets from model(**inputs) with labels (no num_items_in_batch on the ZO path).
        if self.label_smoother is not None:
            return self.label_smoother({"logits": logits}, labels, shift_labels=True)
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
        loss_function = getattr(base, "loss_function", None)
        if loss_function is None:
            raise ZoftError(
                f"method.paired_forward: {type(base).__name__} has no loss_function to score each half; set it to false"
            )
        return loss_function(logits=logits, labels=labels, vocab_size=base.config.vocab_size)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "cls_labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), out["scores"].detach(), inputs["cls_labels"]

    # -- logging, evaluation, saving, resume -----------------------------------------------------

    def log(self, logs, start_time=None):
        if self.dp is not None:
            self.dp.update_logs(logs, self.state.global_step)
        if self._zo_window and "loss" in logs:
            g, lp, lm = (float(np.mean(col)) for col in zip(*self._zo_window))
            logs.update({"zo_projected_grad": g, "zo_loss_plus": lp, "zo_loss_minus": lm})
            if self.zo_optimizer is not None and self.zo_optimizer.clip is not None:  # QZO clipping
                logs["zo_clipped_total"] = self.zo_optimizer.n_clipped
            self._zo_window = []
        self.zoft_metrics.add_to(logs)
        super().log(logs, start_time)

    def privacy_report(self) -> dict | None:
        """Epsilon spent and the settings it depends on; None for a non-private run."""
        return self.dp.report(self.state.global_step) if self.dp is not None else None

    def _flush_zo(self) -> None:
        if self.zo_optimizer is not None:
            self.zo_optimizer.flush()

    @contextlib.contextmanager
    def _distzo_model_without_ddp(self):
        """DistZO2 on several processes: accelerate adds autocast/compile to the model, but not DDP.

        DistZO2 exchanges scalars only; seeded shared randomness keeps the weights equal on every
        rank (checked by the periodic checksum), so DDP's wrapper would only cost a broadcast and
        gradient buckets. It is also what cannot work with ZO2 offload on GPUs: DDP wants a module on
        one device type, and accelerate refuses any model with a multi-entry ``hf_device_map`` in
        distributed mode, which the offloader sets so HF leaves its CPU blocks in place. Inside this
        context accelerate's own switch for such maps (``ACCELERATE_BYPASS_DEVICE_MAP``) is on: the
        blocks are zoft's, not accelerate's big-model hooks.
        """
        if self.zo_distributed is None or self.accelerator.num_processes == 1:
            yield
            return
        previous = os.environ.get(_BYPASS_DEVICE_MAP)
        os.environ[_BYPASS_DEVICE_MAP] = "true"
        try:
            if not getattr(self.model, "_is_accelerate_prepared", False):
                # prepared once here, HF's later accelerator.prepare(model, ...) returns it unwrapped
                self.model_wrapped = self.accelerator.prepare_model(
                    self.model, device_placement=False, evaluation_mode=True
                )
            yield
        finally:
            if previous is None:
                os.environ.pop(_BYPASS_DEVICE_MAP, None)
            else:
                os.environ[_BYPASS_DEVICE_MAP] = previous

    def evaluate(self, *args, **kwargs):
        self._flush_zo()
        with self._distzo_model_without_ddp():
            return super().evaluate(*args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        self._flush_zo()
        super().save_model(output_dir, _internal_call)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.zo_config is not None and self.trajectory_path and self.is_world_process_zero():
            resume_step = None
            if resume_from_checkpoint:
                state = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text())
                resume_step = int(state["global_step"])
            self.create_optimizer()
            cfg = self.zo_config
            header = trajectory_header(
                self.zo_params, method="mezo", eps=cfg.eps, n_directions=cfg.n_directions,
                **(self.offloader.trajectory_info(self.zo_params) if self.offloader is not None else {}),
            )
            self._trajectory = TrajectoryWriter(self.trajectory_path, header, resume_step=resume_step)
        try:
            with self._distzo_model_without_ddp():
                result = super().train(resume_from_checkpoint, *args, **kwargs)
            self._flush_zo()  # a deferred (ZO2) update of the last step lands before anyone reads the model
            return result
        finally:
            if self._trajectory is not None:
                self._trajectory.close()
                self._trajectory = None
