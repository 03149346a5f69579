"""QZO through the recipe path: only NF4 scales move, clipping bounds every update, the saved folder is a
bitsandbytes checkpoint that plain transformers loads, replay rebuilds the scales exactly."""

import glob
import math

import pytest
import torch
from conftest import make_tiny_llama, tiny_recipe
from safetensors.torch import load_file

from zoft import run
from zoft.config import recipe_to_yaml, validate_recipe
from zoft.errors import RecipeError, ZoftError
from zoft.zo import quant4bit as q4
from zoft.zo.qzo import clip_projected_grad
from zoft.zo.trajectory import read_trajectory

bnb = pytest.importorskip("bitsandbytes")
torch.set_num_threads(2)

CLIP = 0.05  # small enough that the tiny model's projected gradients (~0.1-5) get clipped


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory, tokenizer_dir):
    # hidden 64: bitsandbytes' CPU kernel needs in_features >= blocksize (64) to run the saved folder.
    return make_tiny_llama(tmp_path_factory.mktemp("llama64"), tokenizer_dir, hidden=64)


def _tensors(folder):
    out = {}
    for f in glob.glob(f"{folder}/*.safetensors"):
        out.update(load_file(f))
    return out


def _qzo_recipe(model_dir, data, out, **extra):
    sections = {
        "model": {"name": model_dir, "quantization": "nf4"},
        "method": {"name": "qzo", "clip_projected_grad": CLIP, "eps": 1e-2},
        "train": {"learning_rate": 0.05, "save_strategy": "no", "max_steps": 4},
    }
    for k, v in extra.items():
        sections[k] = {**sections.get(k, {}), **v}
    return validate_recipe(tiny_recipe(model_dir, data, out, **sections))


def test_qzo_run_moves_only_scales_clips_saves_a_bnb_checkpoint_and_replays_exactly(
    llama64_dir, sentiment_csv, tmp_path
):
    out = tmp_path / "run"
    recipe = _qzo_recipe(llama64_dir, sentiment_csv, out)
    # As run.train does, keeping the trainer to compare the saved folder with the trained model.
    run.prepare_output_dir(recipe)
    (out / run.RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    trainer = run.build_trainer(recipe)
    trainer.train()
    trainer.save_model(str(out))
    model = trainer.model

    base, _ = run.build_model_and_tokenizer(recipe)
    trained_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained_names and all(n.endswith(".absmax") for n in trained_names)
    layers, base_layers = q4.nf4_layers(model), q4.nf4_layers(base)
    assert len(layers) == 14
    moved = 0.0
    for a, b in zip(layers, base_layers):
        assert torch.equal(a.codes, b.codes)  # the 4-bit codes never change
        assert (a.absmax > 0).all()
        moved = max(moved, (a.absmax - b.absmax).abs().max().item())
    assert moved > 1e-4
    for (n, p), (_, p0) in zip(model.named_parameters(), base.named_parameters()):
        if n not in trained_names:
            assert torch.equal(p, p0), n

    # Clipping: every applied coefficient is within [-C, C]; clipped ones sit on the bound, the others
    # are exactly (L+ - L-) / 2eps.
    _, records = read_trajectory(out / run.TRAJECTORY_FILE)
    assert len(records) == 4
    n_clipped = 0
    for r in records:
        (_, c), lp, lm = r["coefficients"][0], r["loss_plus"][0], r["loss_minus"][0]
        g = (lp - lm) / (2 * 1e-2)
        assert abs(c) <= CLIP
        if r["clipped"]:
            assert abs(g) > CLIP and c == math.copysign(CLIP, g)
        else:
            assert c == pytest.approx(g, rel=1e-9, abs=1e-12)
        n_clipped += r["clipped"]
    assert n_clipped >= 1
    assert trainer.zo_optimizer.n_clipped == n_clipped

    # The saved folder: a bitsandbytes NF4 checkpoint that plain transformers + bitsandbytes load.
    from transformers import AutoModelForCausalLM

    saved = _tensors(out)
    layer0 = model.model.layers[0].self_attn.q_proj
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight.absmax"], layer0.absmax.detach())
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(plain.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    x = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        expected = model(x).logits
    # With grad enabled: bitsandbytes' no-grad CPU path rounds the scales to bf16 (see quant4bit).
    torch.testing.assert_close(plain(x).logits.detach(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(q4.load_quantized(str(out))(x).logits, expected)

    # Replay: base model + trajectory -> the same scales, bit for bit.
    rebuilt = tmp_path / "rebuilt"
    assert run.replay(str(out), str(rebuilt)) == 4
    again = _tensors(rebuilt)
    scale_keys = [k for k in saved if k.endswith(".absmax")]
    assert len(scale_keys) == 14
    for k in scale_keys:
        assert torch.equal(saved[k], again[k]), k


def test_clip_projected_grad_rule():
    assert clip_projected_grad(3.0, None) == (3.0, False)
    assert clip_projected_grad(-3.0, 100.0) == (-3.0, False)
    assert clip_projected_grad(250.0, 100.0) == (100.0, True)
    assert clip_projected_grad(-250.0, 100.0) == (-100.0, True)
    assert clip_projected_grad(float("nan"), 100.0) == (0.0, True)


def test_qzo_default_clip_is_100_and_mezo_stays_unclipped(tiny_llama_dir, sentiment_csv, tmp_path):
    qzo = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, method={"name": "qzo"},
                                      model={"name": tiny_llama_dir, "quantization": "nf4"}))
    assert qzo.method.projected_grad_clip == 100.0
    mezo = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path))
    assert mezo.method.projected_grad_clip is None


def _one_line_error(recipe_dict, match):
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe_dict)
    lines = info.value.lines if hasattr(info.value, "lines") else str(info.value).splitlines()
    assert len(lines) == 1 and match in lines[0], lines


def test_misuse_is_one_line(tiny_llama_dir, sentiment_csv, tmp_path):
    base = dict(model_dir=tiny_llama_dir, data_path=sentiment_csv, out_dir=tmp_path / "x")
    # QZO on a model that is not quantized (no model.quantization and not a bitsandbytes folder).
    recipe = validate_recipe(tiny_recipe(**base, method={"name": "qzo"}))
    with pytest.raises(ZoftError, match="method 'qzo' trains 4-bit quantization scales but .* is not quantized"):
        run.build_model_and_tokenizer(recipe)
    # model.quantization with a first-order method and no peft.
    _one_line_error(tiny_recipe(**base, method={"name": "sgd"}, model={"name": tiny_llama_dir, "quantization": "nf4"}),
                    "model.quantization: first-order training ('sgd')")
    # QZO with a first-order-only option.
    _one_line_error(tiny_recipe(**base, method={"name": "qzo"}, train={"optim": "adamw_torch"},
                                model={"name": tiny_llama_dir, "quantization": "nf4"}),
                    "train.optim: first-order-only option; method 'qzo' has no gradient")
    _one_line_error(tiny_recipe(**base, method={"name": "qzo"}, peft={"method": "lora"}),
                    "method 'qzo' trains the 4-bit quantization scales, not adapters")
    _one_line_error(tiny_recipe(**base, method={"name": "sgd", "clip_projected_grad": 10}),
                    "method.clip_projected_grad: only used by zeroth-order methods")
