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
