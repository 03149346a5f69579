"""ZoftCallback: zoft's first-order methods for your own ``transformers.Trainer``, in one line.

    trainer = Trainer(model=model, args=args, ..., callbacks=[zoft.ZoftCallback.from_recipe("r.yaml")])

It applies what a callback can apply, with the same code the recipe path (``zoft train``) uses:

- WTA-CRS (``memory.wta_crs``, :mod:`zoft.memory.wta_crs`): linear layers are replaced at train begin
  (after your peft wrap) and put back at train end.
- FlashDP (``privacy``, :mod:`zoft.privacy`): per-layer per-sample clipping inside the backward, noise once
  per optimizer step, epsilon in the logs; with shuffled fixed-size batches only (see :class:`ZoftCallback`);
  also on TRL's ``SFTTrainer`` (docs/callback.md, "FlashDP with TRL").
- LoRA-Pro (``peft.optimizer: lora_pro``, the paper's algorithm, :mod:`zoft.lora.pro`): right before your
  Trainer's optimizer steps, each LoRA pair takes LoRA-Pro's step (Adam on the equivalent gradient, its
  moments kept in your optimizer's state) and its gradients are cleared, so your optimizer steps the rest.
- Metrics (:mod:`zoft.metrics`): tokens/s and peak memory (and ``dp_epsilon``) in every training log,
  so ``report_to`` (TensorBoard, W&B) records them.

What a callback cannot do is refused by :meth:`ZoftCallback.from_recipe` with one line naming the
alternative: zeroth-order methods (mezo, qzo, addax) replace the training step, ZO2 offload and DistZO2
live inside that step (use :class:`zoft.ZoftTrainer`, a drop-in for ``Trainer``, or ``zoft train``);
Natural GaLore is an optimizer (pass it as ``Trainer(optimizers=...)``);
LoRA-GA initializes adapters before the Trainer exists; Poisson sampling needs zoft's data loader.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from zoft.errors import ZoftError
from zoft.metrics import ZoftMetricsCallback

__all__ = ["ZoftCallback", "callback_problem"]

_TRAINER_HINT = "use zoft.ZoftTrainer (a drop-in for transformers.Trainer) or `zoft train`"


def callback_problem(recipe) -> str | None:
    """Why a (validated) recipe cannot run as a callback, in one line naming the alternative; None if it can."""
    method = recipe.method.name
    if recipe.offload is not None:
        return (f"offload (ZO2) streams the model's blocks through the device inside zoft's zeroth-order step, "
                f"which a callback cannot run; {_TRAINER_HINT}")
    if recipe.distributed is not None:
        return (f"distributed (DistZO2) splits zoft's zeroth-order step over processes, which a callback cannot "
                f"run; {_TRAINER_HINT} under torchrun")
    if recipe.method.is_zeroth_order:
        default = "" if "method" in recipe.model_fields_set else " (the default when a recipe names no method)"
        return (f"method '{method}'{default} is zeroth-order: it replaces the training step (forward passes only, "
                f"no backward), which a callback cannot do; {_TRAINER_HINT}, or set method: adamw for this callback")
    if method not in ("adamw", "sgd") or getattr(recipe, "optimizer", None) is not None:
        name = method if method not in ("adamw", "sgd") else "the optimizer section"
        return (f"method '{name}' is an optimizer, and a callback cannot replace your Trainer's optimizer; "
                f"pass zoft's optimizer as Trainer(optimizers=(optimizer, None)) or {_TRAINER_HINT}")
    peft = recipe.peft
    if peft is not None and peft.init == "lora_ga":
        return ("peft.init 'lora_ga' initializes the adapters from gradients before the Trainer exists; call "
                "zoft.lora.ga.init_lora_ga(model, lora_config, batches, num_batches) in your script instead, "
                "or use `zoft train`")
    if recipe.privacy is not None and recipe.privacy.sampling == "poisson":
        return _POISSON
    return None


_POISSON = (
    "privacy.sampling 'poisson' (the default) draws every batch by Poisson sampling, which needs zoft's data "
    "loader; use zoft.ZoftTrainer, or set privacy.sampling: shuffle to clip and noise your Trainer's fixed-size "
    "batches (epsilon is then an approximation, not a proven bound)"
)


def _validated(section_cls, data: dict, kwarg: str, recipe_path: str):
    """Validate a keyword argument with its recipe section; one line per problem, named as the keyword."""
    from pydantic import ValidationError

    from zoft.config import _format_error

    try:
        return section_cls.model_validate(data)
    except ValidationError as e:
        prefix = tuple(recipe_path.split("."))
        lines = [
            _format_error({**err, "loc": prefix + tuple(err["loc"])}).replace(recipe_path, kwarg)
            for err in e.errors(include_url=False)
        ]
        raise ZoftError(f"ZoftCallback({kwarg}=...): " + "; ".join(dict.fromkeys(lines))) from None


def _wta_crs_settings(value):
    from zoft.config import WTACRSSection

    if value is None or value is False or isinstance(value, WTACRSSection):
        return value or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"ratio": value}
    if not isinstance(value, Mapping):
        raise ZoftError(
            f"ZoftCallback(wta_crs=...): expected a ratio in (0, 1] or {{'ratio': ..., 'target_modules': [...]}}, "
            f"got {value!r}"
        )
    return _validated(WTACRSSection, dict(value), "wta_crs", "memory.wta_crs")


def _privacy_settings(value):
    from zoft.config import PrivacySection
    from zoft.privacy.trainer_dp import PrivacyConfig

    if value is None:
        return None
    if isinstance(value, PrivacyConfig):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ZoftError(f"ZoftCallback(privacy=...): expected a zoft.privacy.trainer_dp.PrivacyConfig or a dict, "
                        f"got {value!r}")
    data = dict(value)
    seed = data.pop("seed", None)
    section = _validated(PrivacySection, data, "privacy", "privacy")
    if section.method != "flashdp":
        raise ZoftError(f"ZoftCallback(privacy=...): privacy.method '{section.method}' is for zeroth-order training; "
                        f"{_TRAINER_HINT}")
    if section.sampling == "poisson":
        raise ZoftError(f"ZoftCallback(privacy=...): {_POISSON.replace('privacy.sampling: shuffle', 'sampling=shuffle')}")
    return PrivacyConfig(**section.model_dump(), seed=seed)


def _lora_pro_settings(value):
    if value is None or value is False:
        return None
    if value is True or value == "full":
        return "full"
    if value == "efficient":
        from zoft.lora.pro import EFFICIENT_REMOVED

        hint = EFFICIENT_REMOVED.replace("use 'full'", "use lora_pro=True")
        raise ZoftError(f"ZoftCallback(lora_pro='efficient'): {hint}")
    raise ZoftError(f"ZoftCallback(lora_pro=...): expected True (the paper's LoRA-Pro), got {value!r}")


class _ExampleMeanLogProbs(torch.autograd.Function):
    """TRL's per-token log-probabilities, unchanged; the backward gives each example's mean token loss weight 1.

    ``SFTTrainer`` computes its loss from a fused LM head's ``log_probs`` [B, T-1] as ``-sum / num_items``: a
    token mean over the whole accumulation window, so one example's weight would depend on the other
    examples' lengths and the clipped contributions would not be each example's own. The backward returns
    ``d(sum_i l_i) / d log_probs = -mask / n_i`` instead (``l_i`` the mean loss of example i's ``n_i`` label
    tokens), the same objective as :func:`zoft.privacy.trainer_dp.per_sample_losses`. It first checks that the
    trainer's loss was a token-sum NLL times a positive constant (the same negative gradient on every label
    token); any other use of the log-probabilities is refused.
    """

    @staticmethod
    def forward(ctx, log_probs, mask):
        ctx.save_for_backward(mask)
        return log_probs.clone()

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        seen = grad[mask]
        if seen.numel() and (bool((seen >= 0).any()) or bool((seen != seen[0]).any())):
            raise ZoftError(
                "ZoftCallback(privacy=...): the trainer's loss weights the tokens' log-probabilities unevenly "
                "(e.g. SFTConfig(loss_type='dft') or a preference loss), which per-example clipping does not "
                "support; use the token-mean NLL (SFTConfig(loss_type='nll'))"
            )
        counts = mask.sum(1, keepdim=True).clamp(min=1)
        return -(mask.to(grad.dtype) / counts), None


class _ExampleSum(torch.autograd.Function):
    """Returns the loss value the Trainer logs; its backward gives every per-example loss gradient 1.

    FlashDP clips each example's gradient of its own loss, sums, and divides by the batch size itself
    when the noise is added. HF's Trainer multiplies the returned loss by a constant (1 / accumulation
    steps, or 1 when the model saw ``num_items_in_batch``); that constant belongs to the logged value only.
    """

    @staticmethod
    def forward(ctx, losses, value):
        ctx.meta = (losses.shape, losses.dtype, losses.device)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        # `grad` is HF's constant (see above), deliberately dropped: FlashDP wants d(sum of losses).
        shape, dtype, device = ctx.meta
        return torch.ones(shape, dtype=dtype, device=device), None


class ZoftCallback(TrainerCallback):
    """Applies zoft's first-order methods inside a plain ``transformers.Trainer``.

    Build it from a recipe (:meth:`from_recipe`) or with keywords, e.g.
    ``ZoftCallback(wta_crs=0.3, lora_pro=True)`` or
    ``ZoftCallback(privacy={"noise_multiplier": 1.0, "clip_bound": 1.0, "sampling": "shuffle"})``.
    Your script keeps its model (wrap it with peft first), data and ``TrainingArguments``.

    FlashDP in a callback (``privacy``) does what :class:`zoft.ZoftTrainer` does, except the sampling:

    - done: each example's loss (its mean token loss; cross-entropy for 1-D labels) replaces the model's
      batch-mean loss during training forwards, so the backward clips every example's gradient per layer
      (FlashDP) and sums; Gaussian noise ``N(0, (2 sigma C)^2)`` (fixed-size batches: replacing one example
      moves the clipped sum by up to 2C) is added once per optimizer step, after all accumulated
      micro-batches and before ``optimizer.step()``, and the sum divided by the step's examples; with TRL's
      ``SFTTrainer`` the gradient of its fused ``log_probs`` becomes each example's mean token loss's;
      sigma is calibrated for ``state.max_steps`` from ``target_epsilon``; ``dp_epsilon`` is logged and the
      pre-noise ``grad_norm`` HF computes is removed from every log before any reporter sees it;
    - not done: Poisson sampling. Your Trainer's shuffled fixed-size batches are used (``sampling: shuffle``
      must be chosen explicitly, ``dataloader_drop_last=True`` is required) and epsilon is computed as if
      they were Poisson samples with ``q = batch * accumulation / N``: an approximation, not a proven bound
      (:meth:`privacy_report` says ``proven_bound: False``). For a proven bound use ``zoft.ZoftTrainer``.
    - refused at train begin, every problem in one message: ``max_grad_norm > 0``, fp16,
      ``dataloader_drop_last=False``, label smoothing (the loss must come from the batch's labels), TRL's
      ``packing`` / ``padding_free`` / ``loss_type`` other than nll, MoE router logits, several processes;
      a ``compute_loss_func`` is refused at the first step.

    The callback moves itself to the front of the Trainer's callback list, so its ``on_log`` edits a log
    before HF's reporters (TensorBoard, W&B, the progress bar) read it.

    Args:
        wta_crs: a ratio in (0, 1], or ``{"ratio": r, "target_modules": [...], "grad_norm_cache": bool}``
            (recipe ``memory.wta_crs``). Works with gradient checkpointing (TRL's default).
        privacy: a :class:`zoft.privacy.trainer_dp.PrivacyConfig` or a dict of the recipe's ``privacy`` keys
            (``method`` defaults to flashdp; ``seed`` fixes the noise, for debugging only).
        lora_pro: True (or ``"full"``) for LoRA-Pro, the paper's algorithm: each LoRA pair is stepped by
            :func:`zoft.lora.pro.lora_pro_step` with your optimizer's lr (and its betas, eps and weight decay,
            else ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` of your ``TrainingArguments``), its two
            fp32 m x n moments stored in your optimizer's state (so checkpoints keep them).
        metrics: add tokens/s and peak memory to the training logs.

    Raises:
        ZoftError: a setting a callback cannot apply, or an invalid value (one line).
    """

    def __init__(self, *, wta_crs=None, privacy=None, lora_pro=None, metrics: bool = True):
        if isinstance(privacy, Mapping):
            privacy = {"method": "flashdp", **privacy}
        self.wta_crs = _wta_crs_settings(wta_crs)
        self.privacy = _privacy_settings(privacy)
        self.lora_pro = _lora_pro_settings(lora_pro)
        if self.lora_pro and self.privacy is not None:
            raise ZoftError("ZoftCallback: lora_pro with privacy is not supported (the private step has its own "
                            "gradient pipeline); drop one")
        self.metrics = ZoftMetricsCallback() if metrics else None
        self.expected_peft: str | None = None  # from_recipe: the recipe's peft.method, checked on the model
        self._reset()

    def _reset(self) -> None:
        self.engine = None  # zoft.privacy.trainer_dp.PrivacyEngine while training privately
        self._model = None
        self._state = None
        self._wta_names: list[str] = []
        self.grad_norm_cache = None  # zoft.memory.wta_crs.GradNormCache with wta_crs grad_norm_cache
        self._pairs = None
        self._forward_restore = None
        self._loader_len: int | None = None
        self._micro_batches = 1

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, recipe, overrides: list[str] | None = None) -> ZoftCallback:
        """The callback for a recipe's method sections: ``memory.wta_crs``, ``privacy``, ``peft.optimizer``.

        ``recipe`` is a path (as for ``zoft train``), a dict, or a :class:`zoft.config.Recipe`. Its ``model``
        and ``data`` sections may be left out: your script has them. The ``train`` section is not applied
        (your ``TrainingArguments`` are), nor is ``peft``'s adapter, which your model must already carry.

        Raises:
            RecipeError: the recipe is invalid (one line per problem).
            ZoftError: the recipe needs what a callback cannot do (one line naming the alternative).
        """
        from zoft.config import Recipe, apply_overrides, read_recipe_file, validate_recipe

        if isinstance(recipe, Recipe):
            source, parsed = "recipe", recipe
        else:
            source = "recipe" if isinstance(recipe, Mapping) else str(recipe)
            raw = copy.deepcopy(dict(recipe)) if isinstance(recipe, Mapping) else read_recipe_file(Path(recipe))
            raw = apply_overrides(raw, list(overrides or []))
            # A callback recipe may omit what the script provides.
            raw.setdefault("model", {"name": "(your model)"})
            raw.setdefault("data", {"train": "(your data)", "format": "text"})
            parsed = validate_recipe(raw, source=source)
        problem = callback_problem(parsed)
        if problem:
            raise ZoftError(f"{source}: {problem}")
        lora_pro = parsed.peft is not None and parsed.peft.optimizer == "lora_pro"
        privacy = None
        if parsed.privacy is not None:
            privacy = parsed.privacy.model_dump()
        callback = cls(
            wta_crs=parsed.memory.wta_crs if parsed.memory is not None else None,
            privacy=privacy,
            lora_pro=lora_pro or None,
        )
        callback.expected_peft = parsed.peft.method if parsed.peft is not None else None
        return callback

    def describe(self) -> str:
        """What this callback applies, in one line."""
        parts = []
        if self.wta_crs is not None:
            where = f", {len(self._wta_names)} layers" if self._wta_names else ""
            aware = ", gradient-aware" if self.wta_crs.grad_norm_cache else ""
            parts.append(f"WTA-CRS (ratio {self.wta_crs.ratio}{where}{aware})")
        if self.privacy is not None:
            sigma = self.engine.noise_multiplier if self.engine is not None else self.privacy.noise_multiplier
            sigma_text = f"noise multiplier {sigma:.4g}" if sigma is not None else f"target epsilon {self.privacy.target_epsilon}"
            parts.append(f"FlashDP ({sigma_text}, shuffled batches: epsilon approximate, not a proven bound)")
        if self.lora_pro:
            pairs = f", {len(self._pairs)} adapter pairs" if self._pairs else ""
            parts.append(f"LoRA-Pro (Adam on the equivalent gradient{pairs})")
        if self.metrics is not None:
            parts.append("metrics (tokens/s, peak memory)")
        return ", ".join(parts) or "nothing"

    def __repr__(self) -> str:
        return f"ZoftCallback({self.describe()})"

    # -- placement --------------------------------------------------------------------------------

    def _run_first(self) -> bool:
        """Move this callback to the front of the calling Trainer's callback list (see the class docstring).

        Callbacks get no handle on their Trainer, so the ``CallbackHandler`` dispatching this event is found
        on the call stack. Moving an already-called element to the front keeps the dispatch loop exact.
        """
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is self for cb in owner.callbacks):
                if owner.callbacks[0] is not self:
                    owner.callbacks[:] = [self] + [cb for cb in owner.callbacks if cb is not self]
                return True
            frame = frame.f_back
        return False

    # -- events -----------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        self._run_first()

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._reset()
        first = self._run_first()
        if model is None:
            raise ZoftError("ZoftCallback: the Trainer passed no model to its callbacks; use transformers.Trainer")
        if self.privacy is not None and not first:
            raise ZoftError("ZoftCallback(privacy=...): not called by a transformers Trainer, so the pre-noise "
                            "gradient norm could reach the loggers; add it with Trainer(callbacks=[...])")
        self._model, self._state = model, state
        if self.expected_peft is not None and not _has_adapters(model):
            raise ZoftError(
                f"ZoftCallback: the recipe trains {self.expected_peft} adapters (peft section) but the Trainer's "
                "model has none; wrap it first, e.g. peft.get_peft_model(model, LoraConfig(...))"
            )
        if self.metrics is not None:
            self.metrics.on_train_begin(args, state, control)
            self.metrics.attach_token_counter(model)
        if self.wta_crs is not None:
            from zoft.memory.wta_crs import GradNormCache, apply_wta_crs

            if self.wta_crs.grad_norm_cache:
                self.grad_norm_cache = GradNormCache()
            self._wta_names = apply_wta_crs(
                model, self.wta_crs.ratio, self.wta_crs.target_modules, grad_norm_cache=self.grad_norm_cache
            )
        if self.privacy is not None:
            self._start_privacy(args, state, model, train_dataloader)
        if self.lora_pro:
            from zoft.lora.pro import find_lora_pairs

            _check_lora_pro_args(args)
            self._pairs = find_lora_pairs(model)
        if state.is_world_process_zero:
            print(f"zoft: callback applies {self.describe()}", flush=True)

    def on_step_begin(self, args, state, control, **kwargs):
        # The micro-batches of this optimizer step, as HF's loop cuts them: the last step of an epoch gets
        # the remainder. Needed for the logged value of a private loss only.
        accum = args.gradient_accumulation_steps
        self._micro_batches = accum
        if self._loader_len:
            per_epoch = max(math.ceil(self._loader_len / accum), 1)
            if state.global_step % per_epoch == per_epoch - 1:
                self._micro_batches = self._loader_len % accum or accum

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.noise_step()
        if self._pairs:
            self._lora_pro_step(args, kwargs.get("optimizer"))

    def _lora_pro_step(self, args, optimizer) -> None:
        """Each LoRA pair takes LoRA-Pro's step; its gradients are then cleared so ``optimizer`` skips it."""
        from zoft.lora.pro import lora_pro_step

        if optimizer is None:
            raise ZoftError("ZoftCallback(lora_pro=True): the Trainer passed no optimizer to its callbacks; "
                            "use transformers.Trainer")
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for pair in self._pairs:
            if pair.A.grad is None or pair.B.grad is None:
                continue
            group = groups.get(id(pair.A))
            if group is None:
                raise ZoftError(f"ZoftCallback(lora_pro=True): the Trainer's optimizer does not hold {pair.name}'s "
                                "lora_A (its lr drives LoRA-Pro); give the optimizer every trainable parameter")
            lora_pro_step(
                pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling, optimizer.state[pair.A],
                lr=group["lr"], betas=tuple(group.get("betas", (args.adam_beta1, args.adam_beta2))),
                eps=group.get("eps", args.adam_epsilon), weight_decay=group.get("weight_decay", 0.0),
            )
            pair.A.grad, pair.B.grad = None, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        before = dict(logs)
        if self.metrics is not None:
            self.metrics.add_to(logs)
        if self.engine is not None:
            self.engine.update_logs(logs, state.global_step)
        # HF appended {**logs, "step"} to log_history before calling the callbacks: keep it the same.
        if logs != before and state.log_history:
            entry = state.log_history[-1]
            if {k: v for k, v in entry.items() if k != "step"} == before:
                step = entry.get("step", state.global_step)
                entry.clear()
                entry.update({**logs, "step": step})

    def on_evaluate(self, args, state, control, **kwargs):
        if self.metrics is not None:
            self.metrics.on_evaluate(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if self.metrics is not None:
            self.metrics.on_save(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        # Give the model back as it came: plain forwards, plain linear layers, no hooks.
        if self.engine is not None:
            self.engine.detach()
        if self._forward_restore is not None:
            model, previous = self._forward_restore
            if previous is None:
                model.__dict__.pop("forward", None)
            else:
                model.forward = previous
            self._forward_restore = None
        if self._wta_names and self._model is not None:
            from zoft.memory.wta_crs import remove_wta_crs

            remove_wta_crs(self._model)
        if self.metrics is not None:
            self.metrics.detach_token_counter()

    # -- privacy ----------------------------------------------------------------------------------

    def _start_privacy(self, args, state, model, train_dataloader) -> None:
        from zoft.privacy.trainer_dp import PrivacyEngine

        problems = _trainer_setting_problems(args, model)
        dataset = getattr(train_dataloader, "dataset", None)
        try:
            num_samples = len(dataset)
            self._loader_len = len(train_dataloader)
        except TypeError:
            problems.append("the training data set has no length (an IterableDataset), which the accounting "
                            "needs; use a map-style data set")
        if problems:
            # Every refusal at once: a user fixes them in one round trip.
            raise ZoftError("ZoftCallback(privacy=...): " + "; ".join(problems))
        self.engine = PrivacyEngine(
            self.privacy,
            num_samples=num_samples,
            micro_batch_size=args.per_device_train_batch_size,
            accumulation=args.gradient_accumulation_steps,
        )
        self.engine.calibrate(state.max_steps)
        self.engine.attach(model)
        self._patch_forward(model)

    def _patch_forward(self, model) -> None:
        """Make training forwards carry the per-example loss structure FlashDP needs.

        The model's own outputs are returned (so a trainer's ``compute_loss`` finds what it reads) with the
        loss swapped: HF's ``Trainer`` reads ``loss`` (see :class:`_ExampleSum`); TRL's ``SFTTrainer`` calls the
        model with ``fused_lm_head=True`` and builds its loss from ``log_probs`` (see
        :class:`_ExampleMeanLogProbs`), and its entropy / token-accuracy metrics from the other fields.
        """
        from zoft.privacy.trainer_dp import per_sample_losses_from_logits

        previous = model.__dict__.get("forward")  # e.g. accelerate's autocast wrapper
        inner = model.forward

        def forward(*args, **kwargs):
            if not (model.training and torch.is_grad_enabled()):
                return inner(*args, **kwargs)
            if args:
                raise ZoftError("ZoftCallback(privacy=...): the model was called with positional arguments; "
                                "FlashDP needs the Trainer's model(**batch) call")
            labels = kwargs.get("labels")
            if labels is None:
                raise ZoftError(
                    "ZoftCallback(privacy=...): a training batch reached the model without labels (compute_loss_func "
                    "takes them); FlashDP computes each example's loss from them: drop it or use zoft.ZoftTrainer"
                )
            if kwargs.get("fused_lm_head"):
                outputs = inner(**kwargs)  # TRL: per-token log_probs [B, T-1], zero where the label is -100
                self.engine.count_examples(outputs["log_probs"].shape[0])
                outputs["log_probs"] = _ExampleMeanLogProbs.apply(outputs["log_probs"], outputs["label_mask"])
                return outputs
            kwargs.pop("labels")
            # Given num_items_in_batch, HF does not divide the loss by the accumulation steps: divide here so
            # the logged loss is the same either way (the gradient does not depend on it).
            scaled = kwargs.pop("num_items_in_batch", None) is not None
            outputs = inner(**kwargs)
            losses = per_sample_losses_from_logits(outputs["logits"], labels)
            self.engine.count_examples(losses.numel())
            value = losses.detach().mean()
            if scaled:
                value = value / self._micro_batches
            outputs["loss"] = _ExampleSum.apply(losses, value)
            return outputs

        model.forward = forward
        self._forward_restore = (model, previous)

    def privacy_report(self) -> dict[str, Any] | None:
        """Epsilon spent so far and what it depends on (as ``metrics.json``'s ``privacy``); None if not private."""
        if self.engine is None:
            return None
        return self.engine.report(self._state.global_step if self._state is not None else 0)


def _trainer_setting_problems(args, model) -> list[str]:
    """What in the Trainer's arguments (a ``TrainingArguments`` or TRL's ``SFTConfig``) breaks FlashDP, one
    phrase each naming the fix; empty if nothing does."""
    name = type(args).__name__
    problems = []
    if args.world_size > 1:
        problems.append("multi-process training is not supported with privacy; run one process")
    if args.max_grad_norm and args.max_grad_norm > 0:
        problems.append(f"{name}.max_grad_norm={args.max_grad_norm}: global clipping after per-sample clipping "
                        "breaks the privacy guarantee; set max_grad_norm=0")
    if args.fp16:
        problems.append("fp16's loss scaler would scale gradients before per-sample clipping; use bf16 or float32")
    if not args.dataloader_drop_last:
        problems.append(f"set {name}(dataloader_drop_last=True): the accounting assumes every step has "
                        "per_device_train_batch_size x gradient_accumulation_steps examples")
    if args.label_smoothing_factor:
        problems.append("label_smoothing_factor takes the labels away from the model, and FlashDP computes each "
                        "example's loss from them; set it to 0")
    # TRL's SFTConfig: several examples in one row would be clipped as one example.
    if getattr(args, "packing", False):
        problems.append(f"{name}(packing=True) puts several examples into one row, which per-example clipping "
                        "would clip as one and the accounting would miscount; set packing=False")
    if getattr(args, "padding_free", False):
        problems.append(f"{name}(padding_free=True) concatenates the batch's examples into one row, which "
                        "per-example clipping would clip as one; set padding_free=False")
    loss_type = getattr(args, "loss_type", None)
    if isinstance(loss_type, str) and loss_type not in ("nll", "chunked_nll"):
        problems.append(f"{name}(loss_type={loss_type!r}) weights tokens by their probability, and FlashDP clips "
                        "each example's mean token NLL; set loss_type='nll'")
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        problems.append("model.config.output_router_logits=True adds a MoE load-balancing loss over the whole "
                        "batch, which mixes the examples' gradients; set it to False")
    return problems


def _check_lora_pro_args(args) -> None:
    """Refuse the Trainer settings under which LoRA-Pro's step would see the wrong gradients or tensors."""
    from zoft.fsdp import ACCELERATE_SOURCE, accelerate_fsdp_launch, fsdp_requested

    fix = "ZoftCallback(lora_pro=True): "
    if fsdp_requested(getattr(args, "fsdp", None)) or accelerate_fsdp_launch():
        source = "TrainingArguments.fsdp" if fsdp_requested(getattr(args, "fsdp", None)) else ACCELERATE_SOURCE
        raise ZoftError(fix + f"{source}: LoRA-Pro needs each adapter's whole A and B matrices and their gradients, "
                        "which FSDP shards across ranks; train without FSDP (several GPUs: DDP)")
    if args.fp16:
        raise ZoftError(fix + "fp16's loss scaler unscales the gradients inside your optimizer's step, after "
                        "LoRA-Pro's; use bf16 or float32")


def _has_adapters(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return getattr(model, "peft_config", None) is not None or any(isinstance(m, BaseTunerLayer) for m in model.modules())
