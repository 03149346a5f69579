"""Recipe -> model, data, trainer -> evaluate, train, evaluate, save. The one place that wires parts."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from zoft import checkpoints, launch
from zoft.config import Recipe, load_recipe, recipe_to_yaml
from zoft.errors import ZoftError

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
TRAJECTORY_FILE = "trajectory.jsonl"


def prepare_output_dir(recipe: Recipe) -> str | None:
    """Create, refuse, replace or resume the run folder. Returns the checkpoint to resume from."""
    out = Path(recipe.output.dir)
    resume = recipe.output.resume
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        ckpt = Path(resume)
        if not (ckpt / checkpoints.MARKER).is_file():
            raise ZoftError(f"output.resume: {resume} is not a complete zoft checkpoint (no {checkpoints.MARKER})")
        return str(ckpt)
    resume = resume is True or (isinstance(resume, str) and resume.lower() == "true")
    non_empty = out.is_dir() and any(out.iterdir())
    if resume:
        ckpt = checkpoints.latest_complete_checkpoint(out)
        if ckpt is None:
            raise ZoftError(
                f"output.resume: no complete checkpoint in {out} to resume from "
                "(set train.save_steps so checkpoints are written, or drop output.resume)"
            )
        return str(ckpt)
    if out.exists() and not out.is_dir():
        raise ZoftError(f"output.dir: {out} is a file; choose a folder name")
    if non_empty:
        if not recipe.output.overwrite:
            found = checkpoints.checkpoints(out)
            what = f" (it has checkpoint-{found[-1][0]})" if found else ""
            raise ZoftError(
                f"output.dir: {out} already exists and is not empty{what}; continue it with "
                "output.resume=true, replace it with output.overwrite=true, or choose another output.dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def training_arguments(recipe: Recipe):
    from transformers import TrainingArguments

    from zoft.metrics import check_report_to

    kwargs = recipe.train.training_arguments_kwargs()
    check_report_to(kwargs.get("report_to"))  # HF would raise a traceback for a missing logger package
    kwargs.update(output_dir=recipe.output.dir, remove_unused_columns=False)
    kwargs.setdefault("disable_tqdm", False)  # a progress bar even when HF's log level is quiet
    kwargs.setdefault("dataloader_pin_memory", _cuda_available())
    for key, value in launch.cpu_ddp_kwargs(_cuda_available()).items():  # one rank of a CPU launch: gloo
        kwargs.setdefault(key, value)
    if kwargs.get("deepspeed"):
        from zoft.deepspeed import require_deepspeed

        require_deepspeed()
        launch.single_process_env()  # DeepSpeed needs a process group even for one process
    if recipe.method.is_zeroth_order:
        kwargs["max_grad_norm"] = 0.0  # no gradients to clip
        kwargs.setdefault("include_num_input_tokens_seen", "no")
    if recipe.privacy is not None:  # issue 8: HF's global clipping would break the guarantee
        kwargs["max_grad_norm"] = 0.0
        if recipe.privacy.sampling == "shuffle":
            kwargs["dataloader_drop_last"] = True  # fixed-size batches, as the accounting assumes
    if recipe.method.name == "sgd":
        kwargs.setdefault("optim", "sgd")
    elif recipe.method.name == "adamw":
        kwargs.setdefault("optim", "adamw_torch")
    elif recipe.method.name == "natural_galore" and recipe.method.natural_galore_kwargs()["layerwise"]:
        kwargs["max_grad_norm"] = 0.0  # gradients are applied and freed in their hooks: nothing left to clip
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ZoftError(f"train: {first[:400]}") from None


def build_model_and_tokenizer(recipe: Recipe, *, tokenizer=None, init_data=None, device=None):
    """The base model (+ peft adapter) exactly as a run builds it; ``zoft replay`` uses it too.

    ``init_data`` (a :class:`zoft.data.DataBundle`) and ``device`` are needed with ``peft.init: lora_ga``
    only, whose initialization runs on training batches before the peft wrap.
    """
    from transformers import set_seed

    from zoft.models import apply_peft, load_model, load_tokenizer

    set_seed(recipe.train.seed)  # LoRA's random init must be the same in a run and its replay
    m = recipe.model
    if tokenizer is None:
        tokenizer = load_tokenizer(m.tokenizer or m.name, revision=m.revision, trust_remote_code=m.trust_remote_code)
    num_labels = len(recipe.data.verbalizers) if m.task == "sequence_classification" else None
    model = load_model(
        m.name,
        task=m.task,
        dtype=m.dtype,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    if recipe.method.name == "qzo" or m.quantization is not None:  # QZO: NF4 layers, only scales trained
        from zoft.zo.qzo import prepare_qzo_model

        prepare_qzo_model(
            model,
            m.quantization,
            blocksize=m.quantization_blocksize,
            target_modules=m.quantization_target_modules,
            model_name=m.name,
        )
    if recipe.peft is not None and recipe.peft.init == "lora_ga":  # issue 5
        model = _lora_ga_model(model, recipe, init_data, device)
    elif recipe.peft is not None:
        model = apply_peft(model, recipe.peft, m.task)
    if recipe.memory is not None and recipe.memory.wta_crs is not None:
        from zoft.memory.wta_crs import GradNormCache, apply_wta_crs

        wta = recipe.memory.wta_crs
        # After the peft wrap: with LoRA the adapters' lora_A layers are the ones that keep inputs.
        cache = GradNormCache() if wta.grad_norm_cache else None
        apply_wta_crs(model, wta.ratio, wta.target_modules, grad_norm_cache=cache)
    return model, tokenizer


def build_trainer(recipe: Recipe, *, resume: bool = False, args=None):
    """The ZoftTrainer of a recipe; ``args``: its TrainingArguments if already built (:func:`train` does)."""
    from zoft.data import build_datasets
    from zoft.trainer import ZoftTrainer, classification_accuracy
    from zoft.zo.mezo import MeZOConfig

    recipe = launch.fit_recipe_to_launch(recipe)  # e.g. a ZO recipe on several processes trains with DistZO2
    args = training_arguments(recipe) if args is None else args
    launch.join_process_group(args)  # before the model loads: ZeRO-3 partitions it while loading
    if recipe.offload is not None:  # ZO2: the whole model must fit in CPU memory; say so before loading it
        from zoft.plan import _cpu_available, host_bytes_per_process, shape_of_recipe
        from zoft.zo.offload import check_cpu_memory

        # `zoft plan`'s host accounting: the loading peak (checkpoint + converted copy) or, while training, the
        # stored blocks plus the fp32 masters method.master_weights keeps, whichever is larger
        needed = host_bytes_per_process(recipe)
        # The part of it that is fp32 masters (method.master_weights: fp32 on 16-bit weights), named in the refusal.
        masters = 0
        if recipe.method.master_weights == "fp32" and recipe.peft is None and recipe.model.dtype != "float32":
            masters = min(needed, shape_of_recipe(recipe).total_params * 4)
        # Rank 0 decides for all: ranks measuring while others load would disagree, and one refusing alone
        # would leave the rest waiting in a collective.
        launch.on_main_then_share(
            lambda: check_cpu_memory(needed - masters, _cpu_available(), processes=launch.local_world_size(), masters_bytes=masters)
        )
    tokenizer = data = None
    if _uses_lora_ga(recipe):  # issue 5: LoRA-GA's init needs training batches before the model is wrapped
        from zoft.models import load_tokenizer

        m = recipe.model
        tokenizer = load_tokenizer(m.tokenizer or m.name, revision=m.revision, trust_remote_code=m.trust_remote_code)
        data = build_datasets(recipe.data, tokenizer, recipe.model.task)
    model, tokenizer = build_model_and_tokenizer(recipe, tokenizer=tokenizer, init_data=data, device=args.device)
    if data is None:
        data = build_datasets(recipe.data, tokenizer, recipe.model.task)
    zo = None
    if recipe.method.is_zeroth_order:
        # Blocks stored in bf16/fp16 (offload.storage_dtype) compute in float32 and are rounded to their storage
        # dtype by the update (offload.rounding), whatever master_weights says ("fp32" is refused with it).
        zo = MeZOConfig(
            eps=recipe.method.eps,
            n_directions=recipe.method.n_directions,
            distribution=recipe.method.distribution,
            master_weights=recipe.method.master_weights,
            z_generator=recipe.method.z_generator,
            clip_projected_grad=recipe.method.projected_grad_clip,
            paired_forward=recipe.uses_paired_forward,
        )
    privacy = None
    if recipe.privacy is not None:
        from zoft.privacy.trainer_dp import PrivacyConfig

        privacy = PrivacyConfig(**recipe.privacy.model_dump())
    offloader = None
    if recipe.offload is not None:  # ZO2: blocks to CPU memory before the trainer places the model
        from zoft.zo.offload import OffloadConfig, attach_offload

        o = recipe.offload
        offloader = attach_offload(
            model,
            OffloadConfig(
                o.device,
                o.compute_device,
                prefetch=o.prefetch,
                pin_memory=o.pin_memory,
                storage_dtype=o.storage_dtype,
                rounding=o.resolved_rounding,
                sliced_upload=o.sliced_upload,
            ),
        )
    distributed = None
    if recipe.distributed is not None:  # DistZO2; args.device sets up the process group under torchrun
        from zoft.zo.distributed import DistZO, DistZOConfig

        _ = args.device
        d = recipe.distributed
        distributed = DistZO(DistZOConfig(d.perturbation_parallel, d.data_parallel, d.checksum_steps))
    addax = _addax_config(recipe, model, data.train) if recipe.method.name == "addax" else None
    trajectory = None
    if zo is not None and addax is None and recipe.output.save_trajectory:  # addax's FO part is not a scalar log
        trajectory = str(Path(recipe.output.dir) / TRAJECTORY_FILE)
    return ZoftTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        compute_metrics=classification_accuracy if data.kind != "lm" else None,
        zo=zo,
        trajectory_path=trajectory,
        privacy=privacy,
        offloader=offloader,
        distributed=distributed,
        **({"addax": addax} if addax is not None else {}),
        optimizers=(_lora_pro_optimizer(model, recipe, args), None),  # issue 5; None: the method's optimizer
        optimizer_cls_and_kwargs=_natural_galore_cls_and_kwargs(model, recipe, args),
    )


def _addax_config(recipe: Recipe, model, train_rows):
    """Addax's resolved settings; the length threshold is checked against the tokenized training data."""
    from zoft.zo.addax import AddaxConfig, auto_length_threshold, check_split

    m, batch = recipe.method, recipe.train.per_device_train_batch_size
    fo_batch = m.fo_batch_size or batch
    lengths = [len(x) for x in train_rows["input_ids"]]
    threshold = m.length_threshold
    if threshold == "auto":
        threshold = auto_length_threshold(model, m.memory_budget_gb, fo_batch, max(lengths))
        print(f"zoft: addax length threshold {threshold} tokens (from {m.memory_budget_gb} GB)", flush=True)
    alpha = 0.05 if m.alpha is None else m.alpha
    check_split(lengths, threshold, alpha)
    return AddaxConfig(threshold, alpha, m.zo_batch_size or batch, fo_batch)


# ---- LoRA-GA / LoRA-Pro (issue 5; zoft/lora/ga.py, zoft/lora/pro.py, docs/lora.md) -------------

LORA_GA_INIT_DIR = "lora_ga_init"  # the step-0 adapter inside output.dir, needed to export the final one


def _uses_lora_ga(recipe: Recipe) -> bool:
    return recipe.peft is not None and recipe.peft.init == "lora_ga"


def _lora_ga_model(model, recipe: Recipe, data, device):
    """Wrap the base model with LoRA adapters initialized by LoRA-GA from ``peft.lora_ga.num_batches`` batches.

    The batches are the run's training batches (train.per_device_train_batch_size, the data bundle's
    collator, shuffled with train.seed). For verbalizer classification the gradient is that of the loss
    the run trains (cross-entropy over the verbalizer scores, as ``ZoftTrainer.compute_loss``), not of the
    model's own ``labels`` loss. The step-0 adapter is saved to ``output.dir/lora_ga_init``.
    """
    import torch
    from torch.utils.data import DataLoader

    from zoft.lora.ga import init_lora_ga
    from zoft.models import peft_config

    ga = recipe.peft.lora_ga
    batch_size = recipe.train.per_device_train_batch_size
    available = math.ceil(len(data.train) / batch_size)
    if available < ga.num_batches:
        raise ZoftError(
            f"peft.lora_ga.num_batches: LoRA-GA needs {ga.num_batches} gradient batches but the training set "
            f"has {len(data.train)} examples ({available} batches of {batch_size}); lower it to at most {available}"
        )
    loader = DataLoader(
        data.train,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=data.collator,
        generator=torch.Generator().manual_seed(recipe.train.seed),
    )
    model.to(device)  # the Trainer would move it anyway; the gradient passes run where training will
    batches = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in loader)
    loss_fn = None
    if data.kind == "verbalizer":
        from zoft.losses import verbalizer_loss, verbalizer_scores

        def loss_fn(m, batch):
            return verbalizer_loss(verbalizer_scores(m, batch), batch["cls_labels"])

    return init_lora_ga(
        model,
        peft_config(recipe.peft, recipe.model.task),
        batches,
        ga.num_batches,
        scale=ga.scale,
        stable_gamma=ga.stable_gamma,
        # Every rank computes the same initialization (same batches); rank 0 alone writes it.
        initial_adapter_dir=Path(recipe.output.dir) / LORA_GA_INIT_DIR if launch.is_main_process() else None,
        loss_fn=loss_fn,
    )


def _lora_pro_optimizer(model, recipe: Recipe, args):
    """The LoRA-Pro optimizer for ``peft.optimizer: lora_pro``; None otherwise (HF builds the method's)."""
    if recipe.peft is None or recipe.peft.optimizer != "lora_pro":
        return None
    from zoft.lora.pro import create_lora_pro_optimizer

    return create_lora_pro_optimizer(
        model,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        mode=recipe.peft.lora_pro.mode,
    )


def _natural_galore_cls_and_kwargs(model, recipe: Recipe, args):
    """HF's ``optimizer_cls_and_kwargs`` for method natural_galore; None otherwise (HF builds the method's).

    The learning rate, weight decay and Adam's betas/eps come from the train section (TrainingArguments), the
    projection settings from the method section. The groups are built here, from the model the Trainer gets.
    """
    if recipe.method.name != "natural_galore":
        return None
    from zoft.optim import natural_galore_cls_and_kwargs

    try:
        return natural_galore_cls_and_kwargs(
            model,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            **recipe.method.natural_galore_kwargs(),
        )
    except ZoftError as e:
        if str(e).startswith("target_modules"):  # name the recipe key
            raise ZoftError(f"method.{e}") from None
        raise


# ---------------------------------------------------------------------------------------------


def _with_perplexity(metrics: dict) -> dict:
    if "eval_loss" in metrics and "eval_accuracy" not in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and "runtime" not in k and "per_second" not in k}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _start_run_dir(recipe: Recipe) -> str | None:
    resume_from = prepare_output_dir(recipe)
    (Path(recipe.output.dir) / RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    return resume_from


def train(recipe: Recipe) -> dict:
    """Run a recipe end to end: evaluate before, train, evaluate after, save. Returns metrics.

    Under a launcher (torchrun, accelerate launch) every rank runs this; rank 0 alone prepares the
    output folder, prints and writes run files, and the collective steps (training, evaluation,
    saving) run on all ranks.
    """
    recipe = launch.fit_recipe_to_launch(recipe)
    args = training_arguments(recipe)
    launch.join_process_group(args)  # under a launcher, so that rank 0 can share what it finds below
    resume_from = launch.on_main_then_share(lambda: _start_run_dir(recipe))  # no race on output.dir
    main = launch.is_main_process()
    out = Path(recipe.output.dir)
    if recipe.model.name in _model_assets():  # a packaged model is converted once per machine, not per rank
        with args.main_process_first(local=True, desc="zoft model conversion"):
            from zoft.assets import model_asset_path

            model_asset_path(recipe.model.name)
    trainer = build_trainer(recipe, args=args)
    metrics_path = out / METRICS_FILE
    # Every rank reads it: whether to evaluate "before" again must be the same decision everywhere.
    metrics = json.loads(metrics_path.read_text()) if (resume_from and metrics_path.is_file()) else {}

    from zoft.models import count_parameters

    trainable, total = count_parameters(trainer.model)
    launch.main_print(
        f"zoft: {recipe.method.name} on {recipe.model.name}: {trainable:,} of {total:,} parameters trained; "
        f"{len(trainer.train_dataset):,} training / {len(trainer.eval_dataset or []):,} held-out examples"
        + (f"; {args.world_size} processes" if args.world_size > 1 else "")
    )
    first_eval = None
    if recipe.evaluation.before and trainer.eval_dataset is not None and "before" not in metrics:
        # Several processes or DeepSpeed: evaluate as the first thing inside train(), once the model is
        # wrapped. An evaluate() before train() marks the model as prepared, and HF's train() then never
        # wraps it in DDP (ranks would train apart, silently; transformers 5.23 / accelerate 1.15); under
        # DeepSpeed HF cannot evaluate before its engine exists (ZeRO-1/2), or loses the optimizer (ZeRO-3).
        if args.deepspeed or args.world_size > 1:
            trainer.args.eval_on_start = True
            first_eval = _first_evaluation_callback()
            trainer.add_callback(first_eval)
        else:
            metrics["before"] = _with_perplexity(trainer.evaluate())
            if main:
                _write_json(metrics_path, metrics)
            launch.main_print(f"zoft: before training: {_summary(metrics['before'])}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    if first_eval is not None and first_eval.metrics is not None:
        metrics["before"] = _with_perplexity(first_eval.metrics)
        launch.main_print(f"zoft: before training: {_summary(metrics['before'])}")
    metrics["train"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if trainer.privacy_report() is not None:
        metrics["privacy"] = trainer.privacy_report()
        launch.main_print(
            f"zoft: privacy: epsilon {metrics['privacy']['epsilon']:.4g} at delta {metrics['privacy']['delta']:.3g}"
        )
    if recipe.evaluation.after and trainer.eval_dataset is not None:
        metrics["after"] = _with_perplexity(trainer.evaluate())
        launch.main_print(f"zoft: after training:  {_summary(metrics['after'])}")
    if recipe.output.save_model:
        trainer.save_model(str(out))  # on every rank: HF writes on rank 0 (ZeRO-3 gathers the shards first)
        if _uses_lora_ga(recipe) and main:  # issue 5: the adapter for the original base replaces the offset one
            from zoft.lora.ga import save_lora_ga_adapter

            save_lora_ga_adapter(trainer.model, out, out / LORA_GA_INIT_DIR)
    if main:
        _write_json(metrics_path, metrics)
    launch.main_print(f"zoft: saved to {out} (metrics in {metrics_path})")
    return metrics


def _first_evaluation_callback():
    """A TrainerCallback keeping the metrics of a run's first evaluation (HF's ``eval_on_start``) in ``.metrics``."""
    from transformers import TrainerCallback

    class FirstEvaluation(TrainerCallback):
        metrics: dict | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.metrics is None:
                self.metrics = dict(metrics or {})

    return FirstEvaluation()


def _model_assets() -> dict:
    from zoft.assets import MODEL_ASSETS

    return MODEL_ASSETS


def _summary(m: dict) -> str:
    keys = [k for k in ("eval_accuracy", "eval_loss", "eval_perplexity") if k in m]
    return ", ".join(f"{k[5:]} {m[k]:.4f}" for k in keys)


def replay(run_dir: str, out_dir: str) -> int:
    """Rebuild a ZO run's final weights from its base model and trajectory; save them to ``out_dir``."""
    from zoft.zo.perturb import ZOParameters
    from zoft.zo.trajectory import read_trajectory, recorded_z_generator, replay_updates, storage_rounding

    run = Path(run_dir)
    if not (run / RECIPE_FILE).is_file():
        raise ZoftError(f"{run}: not a zoft run folder (no {RECIPE_FILE})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ZoftError(f"--out: {out} already exists and is not empty; choose another folder")
    recipe = load_recipe(run / RECIPE_FILE)
    header, records = read_trajectory(run / TRAJECTORY_FILE)
    model, tokenizer = build_model_and_tokenizer(recipe)
    storage = storage_rounding(header)
    if storage is not None:  # ZO2 with bf16/fp16 storage: start from the blocks (trained or not) as the run stored them
        from zoft.zo.offload import round_blocks_to_storage_

        round_blocks_to_storage_(model, storage[0])
    # Logs written before "rounding" was recorded kept fp32 masters of half-precision weights (the old auto).
    master_weights = "fp32" if "rounding" not in header and header.get("master_weights") else recipe.method.master_weights
    zo = ZOParameters(
        model,
        header["run_seed"],
        distribution=header["distribution"],
        master_weights=master_weights,
        # The run's own generator, whatever this machine would pick: philox replays a CUDA run on CPU.
        z_generator=recorded_z_generator(header),
    )
    n = replay_updates(zo, header, records)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return n
