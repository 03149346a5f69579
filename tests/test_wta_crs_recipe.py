"""WTA-CRS through a recipe: modules replaced after peft, plain checkpoints, misuse refused."""

import pytest
import torch
from conftest import tiny_recipe

from zoft import run
from zoft.config import validate_recipe
from zoft.errors import RecipeError, ZoftError
from zoft.memory.wta_crs import WTACRSLinear


def test_recipe_replaces_lora_inputs_and_saves_an_ordinary_adapter(tiny_llama_dir, sentiment_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = validate_recipe(tiny_recipe(
        tiny_llama_dir, sentiment_csv, tmp_path / "run",
        method="adamw",
        peft={"method": "lora", "r": 4, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        memory={"wta_crs": {"ratio": 0.5, "target_modules": ["q_proj", "k_proj", "v_proj"]}},
        train={"save_strategy": "no", "max_steps": 2},
    ))
    trainer = run.build_trainer(recipe)
    replaced = [n for n, m in trainer.model.named_modules() if isinstance(m, WTACRSLinear)]
    assert len(replaced) == 6 and all(".lora_A." in n for n in replaced)  # 2 layers x q,k,v adapters
    run.prepare_output_dir(recipe)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run")).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trainer.model(ids).logits, atol=1e-6)


def test_wta_crs_with_a_zeroth_order_method_or_bad_ratio_is_refused(tiny_llama_dir, sentiment_csv, tmp_path):
    with pytest.raises(RecipeError) as info:
        validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, memory={"wta_crs": {"ratio": 0.3}}))
    assert "memory.wta_crs saves activations kept for the backward pass, and method 'mezo' has no backward" in info.value.lines[0]
    with pytest.raises(RecipeError) as info:
        validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, method="adamw",
                                    memory={"wta_crs": {"ratio": 1.5}}))
    assert info.value.lines == ["recipe: memory.wta_crs.ratio: Input should be less than or equal to 1 (got 1.5)"]
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "x", method="adamw",
                                         memory={"wta_crs": {"ratio": 0.3, "target_modules": ["qkv"]}}))
    with pytest.raises(ZoftError, match="match"):
        run.build_model_and_tokenizer(recipe)


def _lora_wta_recipe(model_dir, data, out, memory=None, **train):
    return validate_recipe(tiny_recipe(
        model_dir, data, out,
        method="adamw",
        data={"max_train_samples": 16},
        peft={"method": "lora", "r": 4, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        memory={"wta_crs": {"ratio": 0.3, "target_modules": ["q_proj", "k_proj", "v_proj"], **(memory or {})}},
        train={"save_strategy": "no", "max_steps": 2, "learning_rate": 5e-3, **train},
    ))


def _train(recipe):
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer.train()
    return trainer


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_recipe_with_gradient_checkpointing_trains_exactly_as_without(tiny_llama_dir, sentiment_csv, tmp_path,
                                                                       use_reentrant):
    # Regression (issue 22): train.gradient_checkpointing made the recomputed forward draw another sample.
    plain = _train(_lora_wta_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "plain"))
    ckpt = _train(_lora_wta_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "ckpt", gradient_checkpointing=True,
                                   gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}))
    assert ckpt.args.gradient_checkpointing and ckpt.model.is_gradient_checkpointing
    a = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in ckpt.model.named_parameters() if p.requires_grad}
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_recipe_grad_norm_cache_uses_the_norms_from_the_second_epoch_on(tiny_llama_dir, sentiment_csv, tmp_path):
    # 16 rows, 4 per step: epoch 1 is steps 1-4 (every lookup misses), epoch 2 steps 5-8 (every lookup hits).
    recipe = _lora_wta_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "run", memory={"grad_norm_cache": True},
                              max_steps=8)
    trainer = _train(recipe)
    caches = {id(m.grad_norm_cache): m.grad_norm_cache for m in trainer.model.modules() if isinstance(m, WTACRSLinear)}
    assert len(caches) == 1
    cache = next(iter(caches.values()))
    groups = 2  # lora_dropout 0: the q/k/v adapters of a layer read one input and share one sample
    assert (cache.misses, cache.hits) == (4 * groups, 4 * groups)
    assert len(cache) == 16 * groups
    # without the key no cache is made
    plain = run.build_trainer(_lora_wta_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "plain"))
    assert all(m.grad_norm_cache is None for m in plain.model.modules() if isinstance(m, WTACRSLinear))
