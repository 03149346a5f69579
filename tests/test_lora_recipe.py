"""LoRA-GA (peft.init) and LoRA-Pro (peft.optimizer) through recipes: run.train, export, optimizer, errors."""

import json

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file
from transformers import TrainerCallback

from zoft import run
from zoft.config import validate_recipe
from zoft.errors import RecipeError, ZoftError
from zoft.lora.pro import LoraProAdamW, find_lora_pairs, lora_pro_step

LORA = {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
ADAMW = {"name": "adamw"}


def _recipe(model_dir, data, out, *, peft, train=None, method=ADAMW):
    t = {"save_strategy": "no", "max_steps": 3, "learning_rate": 5e-3}
    return validate_recipe(tiny_recipe(model_dir, data, out, method=method, peft=peft, train={**t, **(train or {})}))


def test_lora_ga_run_exports_an_adapter_that_reproduces_the_trained_model_on_the_unmodified_base(
    tiny_llama_dir, sentiment_csv, tmp_path, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    built = []
    real_build = run.build_trainer
    monkeypatch.setattr(run, "build_trainer", lambda r, **kw: built.append(real_build(r, **kw)) or built[-1])
    out = tmp_path / "ga"
    recipe = _recipe(tiny_llama_dir, sentiment_csv, out, peft={**LORA, "init": "lora_ga", "lora_ga": {"num_batches": 2}})
    run.train(recipe)

    assert "train" in json.loads((out / "metrics.json").read_text())
    init_weights = load_file(str(out / run.LORA_GA_INIT_DIR / "adapter_model.safetensors"))
    b0 = [w for n, w in init_weights.items() if "lora_B" in n]
    assert b0 and all(w.abs().max() > 0 for w in b0)  # LoRA-GA's B is not peft's zero init
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 * LORA["r"]  # the rank-2r adapter for the original base

    ids = torch.tensor([[1, 15, 200, 3000, 42, 7, 99, 512]])
    trained = built[0].model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        plain = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, str(out)).eval()
        got = loaded(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # training moved the model away from the base
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_lora_ga_gradient_is_that_of_the_verbalizer_loss_the_run_trains(tiny_llama_dir, sentiment_csv, tmp_path):
    """Paper scale: A = c V[:, :r]^T, so A's rows span the top right singular vectors of the gradient.

    The reference gradient is the plain-torch gradient of ZoftTrainer's classification loss on the same
    shuffled batches; the model's own LM ``labels`` loss would give a different gradient.
    """
    from torch.utils.data import DataLoader

    from zoft.data import build_datasets
    from zoft.models import load_model, load_tokenizer

    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "g",
                     peft={**LORA, "target_modules": ["q_proj"], "init": "lora_ga", "lora_ga": {"num_batches": 2}})
    trainer = run.build_trainer(recipe)
    tok = load_tokenizer(tiny_llama_dir)
    data = build_datasets(recipe.data, tok)
    ref = load_model(tiny_llama_dir)
    loader = DataLoader(data.train, batch_size=4, shuffle=True, collate_fn=data.collator,
                        generator=torch.Generator().manual_seed(recipe.train.seed))
    loss = 0
    for _, batch in zip(range(2), loader):
        loss = loss + trainer.compute_loss(ref, batch) / 2
    loss.backward()
    for layer in range(2):
        grad = ref.model.layers[layer].self_attn.q_proj.weight.grad
        _, _, v = torch.linalg.svd(grad.double())
        top = v[:2].T  # (in, r): the reference's top right singular vectors
        a = trainer.model.base_model.model.model.layers[layer].self_attn.q_proj.lora_A["default"].weight.double()
        a_basis = torch.linalg.qr(a.T).Q
        # cosines of the principal angles between span(A^T) and the reference subspace
        cos = torch.linalg.svdvals(a_basis.T @ top)
        assert cos.min() > 0.99, (layer, cos)


def test_lora_ga_with_too_few_batches_is_one_line(tiny_llama_dir, sentiment_csv, tmp_path):
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "few",
                     peft={**LORA, "init": "lora_ga", "lora_ga": {"num_batches": 3}},
                     train={"per_device_train_batch_size": 4})
    recipe.data.max_train_samples = 6
    with pytest.raises(ZoftError) as info:
        run.build_trainer(recipe)
    assert str(info.value) == (
        "peft.lora_ga.num_batches: LoRA-GA needs 3 gradient batches but the training set has 6 examples "
        "(2 batches of 4); lower it to at most 2"
    )


class _Capture(TrainerCallback):
    """Records the LoRA pairs' weights and raw gradients before each optimizer step, and after it."""

    def __init__(self):
        self.trainer = None
        self.before, self.after, self.lrs = [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        pairs = find_lora_pairs(self.trainer.model)
        self.before.append([(p.A.detach().clone(), p.B.detach().clone(), p.A.grad.clone(), p.B.grad.clone(),
                             p.scaling) for p in pairs])
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after.append([(p.A.grad.clone(), p.B.grad.clone()) for p in find_lora_pairs(self.trainer.model)])


@pytest.mark.parametrize("mode", [None, "full"])
def test_lora_pro_recipe_takes_the_papers_step_with_the_scheduled_lr(tiny_llama_dir, sentiment_csv, tmp_path, mode):
    peft = {**LORA, "optimizer": "lora_pro", **({"lora_pro": {"mode": mode}} if mode else {})}
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / str(mode), peft=peft,
                     train={"lr_scheduler_type": "linear", "max_steps": 3, "max_grad_norm": 0.0})
    assert recipe.peft.lora_pro.mode == "full"  # the paper's algorithm is the default
    trainer = run.build_trainer(recipe)
    capture = _Capture()
    capture.trainer = trainer
    trainer.add_callback(capture)
    trainer.train()

    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, LoraProAdamW) and opt.lora_pro_mode == "full"
    # HF's linear schedule drives it: lr_k = lr * (1 - k / max_steps)
    assert capture.lrs == pytest.approx([5e-3 * (1 - k / 3) for k in range(3)])
    # Each step is lora_pro_step on the pair's weights and raw gradients with that lr (moments carried over).
    states = [{} for _ in capture.before[0]]
    for k in range(2):
        for i, ((a, b, ga, gb, s), (a_next, b_next, *_)) in enumerate(zip(capture.before[k], capture.before[k + 1])):
            a, b = a.clone(), b.clone()
            lora_pro_step(a, b, ga, gb, s, states[i], lr=capture.lrs[k])
            torch.testing.assert_close(a, a_next, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(b, b_next, rtol=1e-5, atol=1e-8)
            assert not torch.equal(b, capture.before[k][i][1])  # the step moved B


@pytest.mark.parametrize(
    ("method", "peft", "message"),
    [
        ("mezo", {**LORA, "optimizer": "lora_pro"},
         "peft.optimizer 'lora_pro': LoRA-Pro corrects gradients, and method 'mezo' has none; use method adamw"),
        ("mezo", {**LORA, "init": "lora_ga"},
         "peft.init 'lora_ga' offsets the base weights from first-order gradients, which method 'mezo' "
         "(and zoft replay) does not use; use method adamw or sgd"),
        ("adamw", {"method": "prefix_tuning", "init": "lora_ga"},
         "peft.init 'lora_ga' initializes LoRA adapters, not peft.method 'prefix_tuning'; use peft.method lora"),
        ("adamw", {"method": "prefix_tuning", "optimizer": "lora_pro"},
         "peft.optimizer 'lora_pro' corrects LoRA gradients, not peft.method 'prefix_tuning'; use peft.method lora"),
        ("sgd", {**LORA, "optimizer": "lora_pro"},
         "peft.optimizer 'lora_pro' is an AdamW optimizer; use method adamw, not 'sgd'"),
        ("adamw", {**LORA, "optimizer": "lora_pro", "lora_pro": {"mode": "efficient"}},
         "peft.lora_pro.mode: 'efficient' was removed: AdamW on LoRA-Pro's corrected A/B gradients trained worse "
         "than plain LoRA (docs/lora.md); use 'full', the paper's Adam on the equivalent gradient (the default)"),
    ],
)
def test_misuse_is_one_line(tiny_llama_dir, sentiment_csv, tmp_path, method, peft, message):
    with pytest.raises(RecipeError) as info:
        validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, method={"name": method}, peft=peft))
    assert info.value.lines == [f"recipe: {message}"]


def test_shipped_recipe_is_valid():
    from zoft.config import load_recipe

    recipe = load_recipe("configs/lora_ga_pro.yaml")
    assert recipe.peft.init == "lora_ga" and recipe.peft.optimizer == "lora_pro"
    assert recipe.method.name == "adamw"


def test_a_lora_ga_pro_recipe_round_trips_through_its_saved_yaml(tiny_llama_dir, sentiment_csv, tmp_path):
    from zoft.config import load_recipe, recipe_to_yaml

    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "rt",
                     peft={**LORA, "init": "lora_ga", "lora_ga": {"num_batches": 3, "scale": "stable"},
                           "optimizer": "lora_pro", "lora_pro": {"mode": "full"}})
    (tmp_path / "r.yaml").write_text(recipe_to_yaml(recipe))
    assert load_recipe(tmp_path / "r.yaml").peft == recipe.peft
