"""Natural GaLore from a recipe (method: natural_galore): the run equals the optimizer driven directly, resume
through the trainer is exact, checkpoints load with weights_only=True, and the recipe errors are one line."""

import inspect

import pytest
import torch
import yaml
from conftest import tiny_recipe, train_until_killed
from safetensors.torch import load_file
from transformers import get_scheduler

from zoft import checkpoints, run
from zoft.config import (
    NATURAL_GALORE_DEFAULTS,
    NATURAL_GALORE_RELATIVE_DAMPING,
    recipe_to_yaml,
    validate_recipe,
)
from zoft.errors import RecipeError, ZoftError
from zoft.losses import verbalizer_loss, verbalizer_scores
from zoft.models import load_model
from zoft.optim import NaturalGaLore, NaturalGaLoreLayerwise, create_natural_galore_optimizer
from zoft.optim import natural_galore as ng

# Small enough for a 2-layer hidden-32 model, with refreshes (T=2) and a wrapping Fisher window (s=3).
GALORE = {"name": "natural_galore", "rank": 4, "update_proj_gap": 2, "history": 3, "damping": 0.5, "scale": 0.5}
TRAIN = {
    "learning_rate": 5e-3,
    "max_steps": 6,
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "warmup_steps": 2,
    "save_strategy": "no",
    "use_cpu": True,  # the plain-loop reference runs on CPU; bit-identity needs the same device
}


def _recipe(model_dir, data, out, method=None, train=None, **sections):
    return validate_recipe(
        tiny_recipe(model_dir, data, out, method={**GALORE, **(method or {})}, train={**TRAIN, **(train or {})},
                    **sections)
    )


def _recording(trainer) -> list[dict]:
    """Keep a copy of every training batch the trainer's loss sees (the real trainer runs unchanged)."""
    seen, compute_loss = [], trainer.compute_loss

    def record(model, inputs, *args, **kwargs):
        if model.training:
            seen.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = record
    return seen


@pytest.mark.parametrize("layerwise", [False, True])
def test_recipe_run_is_bit_identical_to_natural_galore_driven_directly(tiny_llama_dir, sentiment_csv, tmp_path,
                                                                        layerwise):
    """The recipe's optimizer, groups, hyperparameters, lr schedule and clipping are exactly those of a plain loop.

    The reference is the grouped optimizer with HF's linear-with-warmup schedule stepping it, also for the
    layer-wise run: its per-parameter optimizers must see the scheduled lr at every step (with warm-up, a
    constant or one-step-late lr would change every weight). The layer-wise run has no gradient clipping
    (its gradients are gone before a global norm exists); the grouped one clips at HF's default 1.0.
    """
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "run", method={"layerwise": layerwise})
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    seen = _recording(trainer)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, NaturalGaLoreLayerwise if layerwise else NaturalGaLore)
    assert len(seen) == 6

    model = load_model(tiny_llama_dir)
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hyper = {k: v for k, v in GALORE.items() if k != "name"}
    ref = create_natural_galore_optimizer(model, lr=5e-3, weight_decay=0.01, **hyper)  # grouped, not layer-wise
    sched = get_scheduler("linear", ref, num_warmup_steps=2, num_training_steps=6)
    for batch in seen:
        verbalizer_loss(verbalizer_scores(model, batch), batch["cls_labels"]).backward()
        if not layerwise:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ref.step()
        sched.step()
        ref.zero_grad()

    trained = dict(trainer.model.named_parameters())
    moved = max((p - start[n]).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-3
    for name, p in model.named_parameters():
        assert torch.equal(trained[name], p), name
    if layerwise:  # the hooks stepped with the last scheduled lr: 5e-3 * (6 - 5) / (6 - 2)
        q = trainer.model.model.layers[0].self_attn.q_proj.weight
        assert opt.optimizer_dict[q].param_groups[0]["lr"] == 5e-3 * 1 / 4
        assert opt.optimizer_dict[q].state[q]["exp_avg"].shape == (32, 4)
        opt.remove_hooks()


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("layerwise", [False, True])
def test_resume_through_the_trainer_equals_an_uninterrupted_run(tiny_llama_dir, sentiment_csv, tmp_path, layerwise):
    settings = {"method": {"layerwise": layerwise}, "train": {"save_strategy": "steps", "save_steps": 2}}
    straight = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "straight", **settings)
    run.train(straight)

    killed = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "killed", **settings)
    trainer = train_until_killed(killed, 5)  # after checkpoint-4, before step 6
    if layerwise:
        getattr(trainer.optimizer, "optimizer", trainer.optimizer).remove_hooks()
    del trainer
    ckpt = checkpoints.latest_complete_checkpoint(tmp_path / "killed")
    assert ckpt.name == "checkpoint-4"

    # The optimizer checkpoint holds tensors and plain values only, with the projected (rank-4) state.
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    per_param = state["layerwise"] if layerwise else [state]
    projected = [s for sd in per_param for s in sd["state"].values() if "basis" in s]
    assert len(projected) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for s in projected:
        assert 4 in s["exp_avg"].shape and s["grad_history"].shape == (3, *s["exp_avg"].shape)
        assert s["step"] == 4 and s["history_count"] == 3

    resumed = killed.model_copy(update={"output": killed.output.model_copy(update={"resume": True})})
    run.train(resumed)  # steps 5 and 6: a refresh at step 5 (4 % 2 == 0), the window wraps again
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_wta_crs_layers_are_projected_too(tiny_llama_dir, sentiment_csv, tmp_path):
    """Natural GaLore + WTA-CRS compose: the sampled linear layers (not nn.Linear) are still projected."""
    from zoft.memory.wta_crs import WTACRSLinear

    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "w", train={"max_steps": 2},
                     memory={"wta_crs": {"ratio": 0.5}})
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    wrapped = [m.weight for m in trainer.model.modules() if isinstance(m, WTACRSLinear)]
    assert len(wrapped) == 2 * 6  # the default WTA-CRS targets: q k v gate up down
    projected = {id(p) for g in opt.param_groups if g.get("rank") for p in g["params"]}
    assert {id(w) for w in wrapped} <= projected and len(projected) == 2 * 7
    assert all(opt.state[w]["exp_avg"].shape in {(32, 4), (4, 32), (4, 64), (64, 4), (16, 4), (4, 16)}
               for w in wrapped)


def test_nothing_matching_target_modules_is_one_line_naming_the_key(tiny_llama_dir, sentiment_csv, tmp_path):
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "t", method={"target_modules": ["attention.query"]})
    with pytest.raises(ZoftError) as err:
        run.build_trainer(recipe)
    assert str(err.value) == (
        "method.target_modules=['attention.query'] matched no trainable nn.Linear layer; this model's linear "
        "layers are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj "
        "(e.g. model.layers.0.self_attn.q_proj): use some of these names, a regex over full module names, "
        "or 'all-linear'"
    )


# ---- the recipe schema --------------------------------------------------------------------------------------


def test_defaults_are_filled_in_match_the_optimizer_and_survive_a_saved_recipe(tmp_path):
    recipe = validate_recipe(tiny_recipe("m", "d.csv", tmp_path / "o", method="natural_galore"))
    m = recipe.method
    assert (m.rank, m.update_proj_gap, m.scale, m.history, m.damping_mode, m.damping) == (
        128, 200, 0.25, 20, "absolute", 1e-3)  # the paper's fixed lambda
    assert (m.target_modules, m.layerwise, m.refresh) == ("all-linear", False, "reproject")
    # The documented defaults are the optimizer's own.
    assert (ng.DEFAULT_RANK, ng.DEFAULT_UPDATE_PROJ_GAP, ng.DEFAULT_SCALE, ng.DEFAULT_HISTORY,
            ng.DEFAULT_DAMPING_MODE, ng.DEFAULT_DAMPING) == (128, 200, 0.25, 20, "absolute", 1e-3)
    # damping_mode relative without a damping gets the relative default (1.0), not the paper's lambda.
    relative = validate_recipe(tiny_recipe("m", "d.csv", tmp_path / "o",
                                           method={"name": "natural_galore", "damping_mode": "relative"})).method
    assert (relative.damping_mode, relative.damping) == ("relative", ng.DEFAULT_RELATIVE_DAMPING)
    assert ng.DEFAULT_RELATIVE_DAMPING == NATURAL_GALORE_RELATIVE_DAMPING == 1.0
    params = inspect.signature(create_natural_galore_optimizer).parameters
    kwargs = m.natural_galore_kwargs()
    assert kwargs == {k: params[k].default for k in kwargs}
    assert set(NATURAL_GALORE_DEFAULTS) - {"refresh"} | {"reproject_moments"} == set(kwargs)
    # A saved recipe (defaults dumped) loads back the same, and so does another method's.
    assert validate_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe
    adamw = validate_recipe(tiny_recipe("m", "d.csv", tmp_path / "o", method="adamw"))
    assert adamw.method.rank is None and validate_recipe(yaml.safe_load(recipe_to_yaml(adamw))) == adamw
    assert validate_recipe(tiny_recipe("m", "d.csv", tmp_path / "o", method={**GALORE, "refresh": "keep"})
                           ).method.natural_galore_kwargs()["reproject_moments"] is False


LAYERWISE = {**GALORE, "layerwise": True}


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"method": {"name": "adamw", "rank": 64, "layerwise": True}},
         "method.rank, method.layerwise: only used by method 'natural_galore' (method is 'adamw')"),
        ({"method": {"name": "mezo", "history": 0}},
         "method.history: only used by method 'natural_galore' (method is 'mezo')"),
        ({"method": GALORE, "peft": {"method": "lora", "r": 2}},
         "method 'natural_galore' is full-parameter training (it projects the gradients of the model's own "
         "weights); drop the peft section, or use method adamw to train adapters"),
        ({"method": LAYERWISE, "train": {"gradient_accumulation_steps": 2}},
         "train.gradient_accumulation_steps: method.layerwise updates each weight during the backward pass and "
         "frees its gradient, so nothing can be accumulated; set it to 1 (raise train.per_device_train_batch_size "
         "instead) or set method.layerwise: false"),
        ({"method": LAYERWISE, "train": {"max_grad_norm": 1.0}},
         "train.max_grad_norm: method.layerwise applies each gradient as soon as it is computed, so there is no "
         "global gradient norm to clip; drop it or set method.layerwise: false"),
        ({"method": LAYERWISE, "train": {"fp16": True}},
         "train.fp16 with method.layerwise: the fp16 loss scaler unscales gradients only before optimizer.step, "
         "after the layer-wise updates; use bf16 or float32, or method.layerwise: false"),
        ({"method": GALORE, "offload": "cpu"},
         "offload: needs a zeroth-order method (method.name: mezo), not 'natural_galore'; drop the offload "
         "section for first-order training"),
        ({"method": GALORE, "distributed": {"perturbation_parallel": 2}},
         "distributed: needs a zeroth-order method (method.name: mezo), not 'natural_galore'; drop the "
         "distributed section for first-order training"),
        ({"method": GALORE, "privacy": {"method": "flashdp", "noise_multiplier": 1.0, "clip_bound": 1.0}},
         "privacy with method 'natural_galore' is not supported in this version; use method adamw or sgd"),
        ({"method": GALORE, "train": {"optim": "adamw_torch"}},
         "train.optim: not used with method 'natural_galore' (method natural_galore is the optimizer); drop it"),
        ({"method": {**GALORE, "refresh": "reset"}}, "method.refresh: Input should be 'reproject' or 'keep' (got 'reset')"),
        ({"method": {**GALORE, "rank": 0}}, "method.rank: Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_each_bad_combination_is_one_line(tmp_path, sections, expected):
    raw = tiny_recipe("m", "d.csv", tmp_path / "o", **sections)
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, source="r.yaml")
    assert info.value.lines == [f"r.yaml: {expected}"]


def test_layerwise_without_clipping_is_valid_and_turns_hf_clipping_off(tmp_path):
    recipe = validate_recipe(tiny_recipe("m", "d.csv", tmp_path / "o", method=LAYERWISE))
    assert run.training_arguments(recipe).max_grad_norm == 0.0
    grouped = validate_recipe(tiny_recipe("m", "d.csv", tmp_path / "o", method=GALORE))
    assert run.training_arguments(grouped).max_grad_norm == 1.0  # HF's default, as for adamw
