"""ZoftCallback: a plain transformers.Trainer + the callback trains exactly like the recipe path."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_reviews_csv

from zoft import run
from zoft.callback import ZoftCallback
from zoft.config import validate_recipe
from zoft.errors import RecipeError, ZoftError
from zoft.memory.wta_crs import LLAMA_TARGET_MODULES, WTACRSLinear
from zoft.privacy import epsilon_spent
from zoft.privacy.trainer_dp import PrivacyConfig

torch.set_num_threads(2)

LORA = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
# causal LM on the review text; 20 training rows
TEXT = {"format": "text", "template": None, "verbalizers": None, "max_train_samples": 20}
# 4 rows per micro-batch, 3 per step: the 5 micro-batches are cut 3, 2, so step 2 is a partial window.
TRAIN = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "max_steps": 2,
         "learning_rate": 5e-3, "logging_steps": 1, "save_strategy": "no"}
WTA = {"wta_crs": {"ratio": 0.5, "target_modules": ["q_proj", "v_proj"]}}
FLASHDP = {"method": "flashdp", "noise_multiplier": 1.0, "clip_bound": 0.5, "sampling": "shuffle"}
NOISE_SEED = 123


def _recipe(model_dir, data, out, **sections):
    return tiny_recipe(model_dir, data, out, **{"method": "adamw", "peft": LORA, "data": TEXT, "train": TRAIN,
                                                **sections})


def _recipe_trainer(recipe_dict):
    recipe = validate_recipe(recipe_dict)
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    if trainer.dp is not None:
        trainer.dp.seed = NOISE_SEED  # the same noise as the callback run's
    trainer.train()
    return trainer


def _user_trainer(model_dir, data_path, out, callbacks, recipe_dict, accepts_loss_kwargs=None, **args):
    """What a user's own script does: HF model + peft LoRA, a plain transformers.Trainer."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from zoft.data import build_datasets

    set_seed(7)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    # zoft's data pipeline only so that both runs see the same batches
    data = build_datasets(validate_recipe(recipe_dict).data, AutoTokenizer.from_pretrained(model_dir), "causal_lm")
    t = recipe_dict["train"]
    targs = TrainingArguments(
        output_dir=str(out), learning_rate=t["learning_rate"], max_steps=t["max_steps"],
        per_device_train_batch_size=t["per_device_train_batch_size"], logging_steps=t["logging_steps"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"], save_strategy="no", seed=t["seed"],
        lr_scheduler_type="constant", optim="adamw_torch", remove_unused_columns=False, report_to="none",
        disable_tqdm=True, dataloader_pin_memory=False, **args,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data.train, data_collator=data.collator,
                      callbacks=callbacks)
    if accepts_loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs  # a model whose forward takes no **kwargs
    trainer.train()
    return trainer


def _trained(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _assert_same_parameters(a, b):
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def _training_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def _assert_same_logs(recipe_trainer, user_trainer):
    a, b = _training_logs(recipe_trainer), _training_logs(user_trainer)
    assert len(a) == len(b) == recipe_trainer.args.max_steps // int(recipe_trainer.args.logging_steps)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        assert {"tokens_per_second", "peak_memory_mb"} <= set(x)
        for key in set(x) - {"tokens_per_second", "peak_memory_mb"}:  # those two are measurements
            assert x[key] == y[key], key
    assert recipe_trainer.state.log_history[-1]["train_loss"] == user_trainer.state.log_history[-1]["train_loss"]


@pytest.fixture(scope="module")
def plain_lora(tiny_llama_dir, tmp_path_factory):
    """The user's script without the callback: what the methods must change."""

    path = Path(write_reviews_csv(tmp_path_factory.mktemp("plain") / "reviews.csv"))
    recipe = _recipe(tiny_llama_dir, str(path), path.parent / "r")
    return _trained(_user_trainer(tiny_llama_dir, str(path), path.parent / "u", None, recipe))


def _differs(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a) > 1e-6


@pytest.mark.parametrize("method", ["wta_crs", "lora_pro"])
def test_plain_trainer_with_callback_from_recipe_trains_bit_identically_to_the_recipe_path(
    method, tiny_llama_dir, sentiment_csv, tmp_path, plain_lora
):
    sections = {"memory": WTA} if method == "wta_crs" else {"peft": {**LORA, "optimizer": "lora_pro"}}
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "recipe", **sections)
    reference = _recipe_trainer(recipe)
    callback = ZoftCallback.from_recipe(recipe)
    user = _user_trainer(tiny_llama_dir, sentiment_csv, tmp_path / "user", [callback], recipe)

    _assert_same_parameters(_trained(reference), _trained(user))
    _assert_same_logs(reference, user)
    assert _differs(_trained(user), plain_lora)  # the method changed the training
    if method == "wta_crs":
        assert "WTA-CRS (ratio 0.5, 4 layers)" in callback.describe()  # lora_A of q/v in 2 layers
        assert any(isinstance(m, WTACRSLinear) for m in reference.model.modules())
    # The user's model comes back with its own modules
    assert not any(isinstance(m, WTACRSLinear) for m in user.model.modules())


def test_lora_pro_callback_takes_the_papers_step(tiny_llama_dir, sentiment_csv, tmp_path, plain_lora):
    """ZoftCallback(lora_pro=True) in a plain Trainer with AdamW trains exactly as the paper's LoRA-Pro optimizer."""
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "recipe",
                     peft={**LORA, "optimizer": "lora_pro", "lora_pro": {"mode": "full"}})
    reference = _recipe_trainer(recipe)  # create_lora_pro_optimizer(mode="full") in HF's optimizer slot
    callback = ZoftCallback(lora_pro=True)
    user = _user_trainer(tiny_llama_dir, sentiment_csv, tmp_path / "user", [callback], recipe)
    _assert_same_parameters(_trained(reference), _trained(user))
    assert _differs(_trained(user), plain_lora)
    assert callback.describe().startswith("LoRA-Pro (Adam on the equivalent gradient, 4 adapter pairs)")
    # The pairs' moments live in the user's optimizer state (HF checkpoints them), one m x n pair per layer.
    pair = callback._pairs[0]
    state = user.optimizer.state[pair.A]
    assert state["lora_pro_step"] == 2 and state["lora_pro_exp_avg"].shape == (pair.B.shape[0], pair.A.shape[1])


@pytest.mark.parametrize(
    "args, env, line",
    [
        ({"fsdp": "full_shard auto_wrap", "fp16": False}, None,
         "ZoftCallback(lora_pro=True): TrainingArguments.fsdp: LoRA-Pro needs each adapter's whole A and B matrices and "
         "their gradients, which FSDP shards across ranks; train without FSDP (several GPUs: DDP)"),
        ({"fsdp": None, "fp16": False}, "true",
         "ZoftCallback(lora_pro=True): accelerate launch with FSDP (ACCELERATE_USE_FSDP=true): LoRA-Pro needs each "
         "adapter's whole A and B matrices and their gradients, which FSDP shards across ranks; train without FSDP "
         "(several GPUs: DDP)"),
        ({"fsdp": None, "fp16": True}, None,
         "ZoftCallback(lora_pro=True): fp16's loss scaler unscales the gradients inside your optimizer's step, after "
         "LoRA-Pro's; use bf16 or float32"),
    ],
    ids=["train-fsdp", "accelerate-fsdp", "fp16"],
)
def test_lora_pro_callback_refuses_fsdp_and_fp16_at_train_begin(monkeypatch, args, env, line):
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import TrainerControl, TrainerState

    if env is not None:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", env)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    callback = ZoftCallback(lora_pro=True, metrics=False)
    with pytest.raises(ZoftError) as info:
        callback.on_train_begin(SimpleNamespace(**args), TrainerState(), TrainerControl(), model=model)
    assert str(info.value) == line


def test_flashdp_callback_gives_the_recipe_paths_weights_losses_and_epsilon(
    tiny_llama_dir, sentiment_csv, tmp_path, plain_lora
):
    # one log, at step 2: each epsilon costs the accountant a second
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "recipe", privacy=FLASHDP,
                     train={**TRAIN, "logging_steps": 2})
    reference = _recipe_trainer(recipe)
    # The model sees num_items_in_batch (HF then does not divide the loss by the accumulation steps), or it does
    # not (a forward without **kwargs: HF divides): the same training either way.
    for accepts_loss_kwargs in (True, False):
        callback = ZoftCallback(privacy=PrivacyConfig(**FLASHDP, seed=NOISE_SEED))
        user = _user_trainer(tiny_llama_dir, sentiment_csv, tmp_path / f"user{accepts_loss_kwargs}", [callback],
                             recipe, accepts_loss_kwargs=accepts_loss_kwargs, max_grad_norm=0.0,
                             dataloader_drop_last=True)
        _assert_same_parameters(_trained(reference), _trained(user))
        _assert_same_logs(reference, user)
    assert _differs(_trained(user), plain_lora)
    q, delta = 12 / 20, 1 / 20**1.1  # N = 20 training rows, 4 x 3 per step
    for entry in _training_logs(user):
        assert "grad_norm" not in entry  # HF's pre-noise norm is never released
        assert entry["dp_epsilon"] == pytest.approx(epsilon_spent(q, 1.0, entry["step"], delta), rel=1e-12)
    report = callback.privacy_report()
    assert report == reference.privacy_report()
    assert report["steps"] == 2 and report["sampling"] == "shuffle" and report["proven_bound"] is False
    # FlashDP is detached and the model's forward is its own again
    assert not any("forward" in m.__dict__ for m in user.model.modules())


def test_keyword_construction_is_the_recipes(tiny_llama_dir, sentiment_csv, tmp_path):
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path, memory=WTA, peft={**LORA, "optimizer": "lora_pro"})
    from_recipe = ZoftCallback.from_recipe(recipe)
    keywords = ZoftCallback(wta_crs=WTA["wta_crs"], lora_pro=True)
    assert (from_recipe.wta_crs, from_recipe.lora_pro) == (keywords.wta_crs, keywords.lora_pro) != (None, None)
    assert ZoftCallback(wta_crs=0.25).wta_crs.target_modules == LLAMA_TARGET_MODULES  # the recipe's default
    # a callback-only recipe: no model or data (the script has them)
    only = ZoftCallback.from_recipe({"method": "adamw", "privacy": FLASHDP})
    assert only.privacy == PrivacyConfig(**FLASHDP)
    assert only.describe() == ("FlashDP (noise multiplier 1, shuffled batches: epsilon approximate, not a proven "
                               "bound), metrics (tokens/s, peak memory)")


HINT = "use zoft.ZoftTrainer (a drop-in for transformers.Trainer) or `zoft train`"


@pytest.mark.parametrize(
    "sections, line",
    [
        ({"method": "mezo"}, f"method 'mezo' is zeroth-order: it replaces the training step (forward passes only, "
                             f"no backward), which a callback cannot do; {HINT}, or set method: adamw for this callback"),
        ({}, "method 'mezo' (the default when a recipe names no method) is zeroth-order: it replaces the training "
             f"step (forward passes only, no backward), which a callback cannot do; {HINT}, or set method: adamw "
             "for this callback"),
        ({"method": "qzo"}, f"method 'qzo' is zeroth-order: it replaces the training step (forward passes only, "
                            f"no backward), which a callback cannot do; {HINT}, or set method: adamw for this callback"),
        ({"method": {"name": "addax", "length_threshold": 16}},
         f"method 'addax' is zeroth-order: it replaces the training step (forward passes only, no backward), which "
         f"a callback cannot do; {HINT}, or set method: adamw for this callback"),
        ({"method": "mezo", "privacy": {"method": "dpzero", "noise_multiplier": 1.0, "clip_bound": 1.0}},
         f"method 'mezo' is zeroth-order: it replaces the training step (forward passes only, no backward), which "
         f"a callback cannot do; {HINT}, or set method: adamw for this callback"),
        ({"method": "mezo", "offload": "cpu"},
         f"offload (ZO2) streams the model's blocks through the device inside zoft's zeroth-order step, which a "
         f"callback cannot run; {HINT}"),
        ({"method": "mezo", "distributed": {"perturbation_parallel": 2}},
         f"distributed (DistZO2) splits zoft's zeroth-order step over processes, which a callback cannot run; "
         f"{HINT} under torchrun"),
        ({"method": "adamw", "peft": {**LORA, "init": "lora_ga"}},
         "peft.init 'lora_ga' initializes the adapters from gradients before the Trainer exists; call "
         "zoft.lora.ga.init_lora_ga(model, lora_config, batches, num_batches) in your script instead, or use "
         "`zoft train`"),
        ({"method": "adamw", "privacy": {**FLASHDP, "sampling": "poisson"}},
         "privacy.sampling 'poisson' (the default) draws every batch by Poisson sampling, which needs zoft's data "
         "loader; use zoft.ZoftTrainer, or set privacy.sampling: shuffle to clip and noise your Trainer's "
         "fixed-size batches (epsilon is then an approximation, not a proven bound)"),
    ],
    ids=["mezo", "default-method", "qzo", "addax", "dpzero", "zo2", "distzo2", "lora_ga", "poisson"],
)
def test_from_recipe_refuses_what_a_callback_cannot_do_with_one_line(sections, line):
    with pytest.raises(ZoftError) as info:
        ZoftCallback.from_recipe(sections)
    assert str(info.value) == f"recipe: {line}"


def test_from_recipe_names_the_file_and_reports_invalid_recipes_like_zoft_validate(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: mezo\n")
    with pytest.raises(ZoftError) as info:
        ZoftCallback.from_recipe(path)
    assert str(info.value).startswith(f"{path}: method 'mezo' is zeroth-order")
    path.write_text("method: adamw\nmemory:\n  wta_crs:\n    ratio: 2\n")
    with pytest.raises(RecipeError) as info:
        ZoftCallback.from_recipe(path)
    assert info.value.lines == [f"{path}: memory.wta_crs.ratio: Input should be less than or equal to 1 (got 2)"]
    # overrides as on the command line
    assert ZoftCallback.from_recipe(path, ["memory.wta_crs.ratio=0.5"]).wta_crs.ratio == 0.5


def test_an_optimizer_method_is_refused_with_the_optimizer_slot_named():
    from zoft.callback import callback_problem

    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": "d", "format": "text"}, "method": "adamw"})
    recipe.method.__dict__["name"] = "natural_galore"  # a method that is an optimizer (as Natural GaLore)
    assert callback_problem(recipe) == (
        "method 'natural_galore' is an optimizer, and a callback cannot replace your Trainer's optimizer; pass "
        "zoft's optimizer as Trainer(optimizers=(optimizer, None)) or use zoft.ZoftTrainer (a drop-in for "
        "transformers.Trainer) or `zoft train`"
    )


@pytest.mark.parametrize(
    "kwargs, line",
    [
        ({"wta_crs": 1.5}, "ZoftCallback(wta_crs=...): wta_crs.ratio: Input should be less than or equal to 1 (got 1.5)"),
        ({"wta_crs": "q_proj"}, "ZoftCallback(wta_crs=...): expected a ratio in (0, 1] or {'ratio': ..., "
                                "'target_modules': [...]}, got 'q_proj'"),
        ({"privacy": {**FLASHDP, "epsilon": 3}},
         "ZoftCallback(privacy=...): privacy.epsilon: unknown key; did you mean 'privacy.target_epsilon'? (expected "
         "one of: method, target_epsilon, noise_multiplier, delta, clip_bound, clip_bounds, sampling, accountant, "
         "path)"),
        ({"privacy": {"noise_multiplier": 1.0, "clip_bound": 1.0}},
         "ZoftCallback(privacy=...): privacy.sampling 'poisson' (the default) draws every batch by Poisson sampling, "
         "which needs zoft's data loader; use zoft.ZoftTrainer, or set sampling=shuffle to clip and noise your "
         "Trainer's fixed-size batches (epsilon is then an approximation, not a proven bound)"),
        ({"privacy": {**FLASHDP, "method": "dpzero"}},
         f"ZoftCallback(privacy=...): privacy.method 'dpzero' is for zeroth-order training; {HINT}"),
        ({"lora_pro": "efficient"}, "ZoftCallback(lora_pro='efficient'): 'efficient' was removed: AdamW on LoRA-Pro's "
                                    "corrected A/B gradients trained worse than plain LoRA (docs/lora.md); use "
                                    "lora_pro=True, the paper's Adam on the equivalent gradient (the default)"),
        ({"lora_pro": True, "privacy": FLASHDP},
         "ZoftCallback: lora_pro with privacy is not supported (the private step has its own gradient pipeline); "
         "drop one"),
    ],
    ids=["ratio", "wta-type", "privacy-key", "poisson", "dpzero", "lora-pro-efficient", "pro+privacy"],
)
def test_keyword_mistakes_get_one_line(kwargs, line):
    with pytest.raises(ZoftError) as info:
        ZoftCallback(**kwargs)
    assert str(info.value) == line


def test_train_begin_refuses_settings_that_break_the_method(tiny_llama_dir, sentiment_csv, tmp_path):
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "r", privacy=FLASHDP)
    with pytest.raises(ZoftError) as info:  # HF's default max_grad_norm is 1.0
        _user_trainer(tiny_llama_dir, sentiment_csv, tmp_path / "u", [ZoftCallback(privacy=FLASHDP)], recipe,
                      dataloader_drop_last=True)
    assert str(info.value) == (
        "ZoftCallback(privacy=...): TrainingArguments.max_grad_norm=1.0: global clipping after per-sample "
        "clipping breaks the privacy guarantee; set max_grad_norm=0"
    )
    with pytest.raises(ZoftError) as info:
        _user_trainer(tiny_llama_dir, sentiment_csv, tmp_path / "u", [ZoftCallback(privacy=FLASHDP)], recipe,
                      max_grad_norm=0.0)
    assert str(info.value) == (
        "ZoftCallback(privacy=...): set TrainingArguments(dataloader_drop_last=True): the accounting assumes every "
        "step has per_device_train_batch_size x gradient_accumulation_steps examples"
    )


def test_a_recipe_with_adapters_needs_a_model_with_adapters(tiny_llama_dir, sentiment_csv, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    callback = ZoftCallback.from_recipe({"method": "adamw", "peft": LORA, "memory": WTA})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none"),
                      train_dataset=rows, callbacks=[callback])
    with pytest.raises(ZoftError) as info:
        trainer.train()
    assert str(info.value) == (
        "ZoftCallback: the recipe trains lora adapters (peft section) but the Trainer's model has none; wrap it "
        "first, e.g. peft.get_peft_model(model, LoraConfig(...))"
    )


def test_callback_runs_before_the_loggers(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import DefaultFlowCallback

    callback = ZoftCallback()
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                      args=TrainingArguments(output_dir=str(tmp_path), report_to="none"), callbacks=[callback])
    handlers = trainer.callback_handler.callbacks
    assert handlers[0] is callback and isinstance(handlers[1], DefaultFlowCallback)
    assert sum(cb is callback for cb in handlers) == 1
