"""`zoft plan`: exact weight/adapter counts from the meta device, and the fit/recommendation text."""

import torch
import yaml
from conftest import tiny_recipe
from transformers import LlamaConfig, LlamaForCausalLM

from zoft.plan import estimate, model_shape

CFG = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
           num_key_value_heads=1, tie_word_embeddings=True)


def test_meta_device_counts_equal_the_materialized_model():
    from peft import LoraConfig, get_peft_model

    shape = model_shape(LlamaConfig(**CFG), lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    real = LlamaForCausalLM(LlamaConfig(**CFG))
    params = list(real.parameters())  # tied embedding / head once
    assert shape.total_params == sum(p.numel() for p in params)
    assert shape.block_params == sum(p.numel() for p in real.model.layers.parameters())
    assert shape.largest_block_params == sum(p.numel() for p in real.model.layers[0].parameters())
    est = estimate(shape, method="mezo", lora=False, offload=False, batch=2, seq=16)
    assert est.gpu["weights"] == sum(p.numel() * p.element_size() for p in params)
    peft_model = get_peft_model(real, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert shape.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_offload_moves_block_weights_to_cpu_and_adamw_adds_gradients_and_state():
    shape = model_shape(LlamaConfig(**CFG))
    common = dict(batch=2, seq=16, lora=False)
    plain = estimate(shape, method="mezo", offload=False, **common)
    off = estimate(shape, method="mezo", offload=True, **common)
    adam = estimate(shape, method="adamw", offload=False, **common)
    n, blocks, one = shape.total_params, shape.block_params, shape.largest_block_params
    assert off.gpu["weights"] == (n - blocks + 2 * one) * 4  # resident parts + computing + prefetched block
    assert off.cpu["weights (offloaded blocks)"] == blocks * 4
    assert adam.gpu["gradients"] == 4 * n and adam.gpu["optimizer state"] == 8 * n
    assert adam.gpu["activations"] > plain.gpu["activations"]  # stored for backward vs one block's worth
    bf16 = estimate(shape, method="mezo", offload=True, dtype="bfloat16", **common)
    assert bf16.cpu["fp32 masters"] == 4 * n and bf16.cpu["weights (offloaded blocks)"] == 2 * blocks
    # offload.storage_dtype: blocks stored in bf16, computed in fp32 (no masters), staged in bf16 on upload.
    stored = estimate(shape, method="mezo", offload=True, storage_dtype="bfloat16", **common)
    assert stored.label == "mezo full + offload (bfloat16 storage)"
    assert stored.cpu["weights (offloaded blocks)"] == 2 * blocks and "fp32 masters" not in stored.cpu
    assert stored.gpu["weights"] == off.gpu["weights"] and stored.gpu["upload staging"] == 2 * one


def test_offload_plans_the_paired_forward_by_default_with_the_activations_of_a_doubled_batch():
    from zoft.plan import activation_bytes

    shape = model_shape(LlamaConfig(**CFG))
    common = dict(method="mezo", lora=False, batch=2, seq=16)
    paired = estimate(shape, offload=True, **common)  # paired_forward auto: on with offload
    two = estimate(shape, offload=True, paired=False, **common)
    assert paired.gpu["activations (paired: doubled batch)"] == activation_bytes(shape, 4, 16, 4, stored=False)
    assert two.gpu["activations"] == activation_bytes(shape, 2, 16, 4, stored=False)
    assert paired.gpu["ZO temporaries"] == 2 * two.gpu["ZO temporaries"]  # theta +- eps z both live
    assert "activations (paired: doubled batch)" not in estimate(shape, offload=False, **common).gpu


def test_plan_refuses_the_in_memory_setting_and_recommends_offload_when_only_that_fits():
    from zoft.plan import render

    big = LlamaConfig(**{**CFG, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16,
                         "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 1000})
    shape = model_shape(big, lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    common = dict(batch=1, seq=64)
    chosen = estimate(shape, method="mezo", lora=False, offload=False, **common)
    alts = [chosen, estimate(shape, method="mezo", lora=False, offload=True, **common),
            estimate(shape, method="adamw", lora=False, offload=False, **common)]
    gpu_free = (chosen.gpu_total + alts[1].gpu_total) // 2  # between the offloaded and the full footprint
    text = render(chosen, alts, device="test GPU", gpu_free=gpu_free, cpu_free=64 * 1024**3, cuda=True)
    need = f"{chosen.gpu_total / 1024**3:.2f}"
    assert f"verdict: mezo full does not fit (needs about {need} GiB)" in text
    assert "recommendation: mezo full + offload fits: add `offload: cpu` to the recipe" in text
    assert "| mezo full + offload |" in text and "| yes |" in text
    # CPU-only: blocks "offloaded" to the same memory save nothing, so nothing is recommended there.
    cpu_text = render(chosen, alts, device="cpu", gpu_free=gpu_free, cpu_free=gpu_free, cuda=False)
    assert "recommendation: none of these settings fits" in cpu_text


def test_cli_plan_prints_the_table(tiny_llama_dir, sentiment_csv, tmp_path, capsys):
    from zoft.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "out")))
    assert main(["plan", str(path), "offload=cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("zoft plan: mezo full + offload")
    assert "| mezo + LoRA |" in out and "| adamw full |" in out
    assert "| mezo full + offload (bfloat16 storage) |" in out
    assert main(["plan", str(path), "offload.storage_dtype=bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("zoft plan: mezo full + offload (bfloat16 storage)")


def test_qzo_rows_equal_the_bytes_of_a_model_quantized_by_prepare_qzo_model():
    from zoft.zo.qzo import prepare_qzo_model

    for cfg, targets in [(CFG, "all-linear"), ({**CFG, "tie_word_embeddings": False}, ["q_proj", "down_proj"])]:
        shape = model_shape(LlamaConfig(**cfg), nf4_target_modules=targets)
        est = estimate(shape, method="qzo", lora=False, offload=False, batch=2, seq=16, nf4_blocksize=32)
        torch.manual_seed(0)
        real = LlamaForCausalLM(LlamaConfig(**cfg))
        trained = prepare_qzo_model(real, "nf4", blocksize=32, target_modules=targets)
        codes = sum(t.numel() for n, t in real.named_buffers() if n.endswith(".codes"))
        scales = sum(p.numel() for p in real.parameters() if p.requires_grad)
        # what is left as loaded: embeddings, norms, an untied lm_head, layers outside target_modules
        rest = sum(p.numel() * p.element_size() for p in real.parameters()) - 4 * scales
        assert est.label == "qzo NF4" and len(trained) > 0
        assert est.gpu["weights (NF4 codes)"] == codes
        assert est.gpu["weights (fp32 scales, trained)"] == 4 * scales
        assert est.gpu["weights (not quantized)"] == rest
        assert est.gpu["ZO temporaries"] == 2 * 4 * max(p.numel() for p in real.parameters() if p.requires_grad)
        assert "gradients" not in est.gpu and "optimizer state" not in est.gpu


def test_addax_keeps_one_gradient_and_the_larger_of_its_two_activation_sets():
    from zoft.plan import activation_bytes

    shape = model_shape(LlamaConfig(**CFG))
    common = dict(method="addax", lora=False, offload=False, batch=4, seq=64)
    long_heavy = estimate(shape, addax=(8, 2, 16), **common)
    short_heavy = estimate(shape, addax=(1, 16, 48), **common)
    assert long_heavy.gpu["gradients (one tensor at a time)"] == 4 * shape.largest_tensor  # not 4 x all params
    assert "optimizer state" not in long_heavy.gpu
    key = "activations (max of ZO long / FO short batch)"
    assert long_heavy.gpu[key] == activation_bytes(shape, 8, 64, 4, stored=False)
    assert short_heavy.gpu[key] == activation_bytes(shape, 16, 48, 4, stored=True)
    adam = estimate(shape, method="adamw", lora=False, offload=False, batch=4, seq=64)
    assert long_heavy.gpu_total < adam.gpu_total


def test_cli_plan_of_qzo_and_addax_recipes_puts_their_own_row_first(tiny_llama_dir, sentiment_csv, tmp_path, capsys):
    from zoft.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "out")))
    assert main(["plan", str(path), "method.name=qzo", "model.quantization=nf4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("zoft plan: qzo NF4\n") and "| weights (NF4 codes) |" in out
    assert out.split("| setting |")[1].splitlines()[2].startswith("| qzo NF4 |")
    assert main(["plan", str(path), "method.name=addax", "method.length_threshold=16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("zoft plan: addax full\n") and "| gradients (one tensor at a time) |" in out
