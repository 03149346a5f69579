"""`zoft plan`: counts against real tiny models and optimizers, the settings it honours, published figures, the CLI."""

import pytest
import torch
import yaml
from conftest import tiny_recipe
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from zoft.errors import ZoftError
from zoft.plan import (
    GiB,
    Setting,
    _master_bytes_per_param,
    _stored_per_layer,
    estimate,
    inference_activation_bytes,
    model_shape,
    stored_activation_bytes,
)

CFG = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
           num_key_value_heads=1, tie_word_embeddings=True)


def _masters(est):
    return sum(v for part in (est.gpu, est.cpu) for k, v in part.items() if "masters" in k and "copy" not in k)


def test_meta_device_counts_equal_the_materialized_model():
    from peft import LoraConfig, get_peft_model

    shape = model_shape(LlamaConfig(**CFG), lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    real = LlamaForCausalLM(LlamaConfig(**CFG))
    params = list(real.parameters())  # tied embedding / head once
    assert shape.total_params == sum(p.numel() for p in params)
    assert shape.block_params == sum(p.numel() for p in real.model.layers.parameters())
    assert shape.largest_block_params == sum(p.numel() for p in real.model.layers[0].parameters())
    assert shape.tied_params == real.model.embed_tokens.weight.numel()
    est = estimate(shape, method="mezo", batch=2, seq=16)
    assert est.gpu["weights"] == sum(p.numel() * p.element_size() for p in params)
    peft_model = get_peft_model(real, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert shape.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.lora_groups == {"attn_in": 2}


# ---- activations: what autograd keeps ------------------------------------------------------------------------------


def _saved_bytes(model, ids, mask):
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and not (t.is_leaf and t.requires_grad):
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    return sum(seen.values())


def _tiny(family, attention, layers):
    if family == "llama":
        return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)
    return OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=160, num_hidden_layers=layers, num_attention_heads=4,
                     word_embed_proj_dim=64, attn_implementation=attention, dropout=0.0, attention_dropout=0.0)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stored_activations_per_layer_equal_what_autograd_saves(family, attention, lora, dtype):
    from peft import LoraConfig, get_peft_model

    batch, seq, lora_cfg = 3, 40, {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    measured = []
    for layers in (2, 3):  # one more layer: the difference is one layer's saved tensors
        torch.manual_seed(0)
        cls = LlamaForCausalLM if family == "llama" else OPTForCausalLM
        model = cls(_tiny(family, attention, layers)).to(getattr(torch, dtype))
        if lora:
            model = get_peft_model(model, LoraConfig(**lora_cfg))
        model.train()
        ids = torch.randint(0, 300, (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :5] = 0  # a padded row: the attention gets a mask, as in a real batch
        measured.append(_saved_bytes(model, ids, mask))
    shape = model_shape(_tiny(family, attention, 2), lora=lora_cfg if lora else None)
    setting = Setting(method="adamw", lora=lora, batch=batch, seq=seq, dtype=dtype)
    planned = _stored_per_layer(shape, setting, batch * seq, 4 if dtype == "float32" else 2)
    # exact for Llama; OPT's two LayerNorm statistics differ by one fp32 value per token in bf16
    assert planned == pytest.approx(measured[1] - measured[0], rel=0.01, abs=0)


def test_gradient_checkpointing_keeps_each_layers_input_and_one_layer():
    shape = model_shape(LlamaConfig(**{**CFG, "num_hidden_layers": 8}))
    s = Setting(method="adamw", batch=4, seq=64)
    full = stored_activation_bytes(shape, s, 4, 64)
    ckpt = stored_activation_bytes(shape, Setting(method="adamw", batch=4, seq=64, gradient_checkpointing=True), 4, 64)
    layer = _stored_per_layer(shape, s, 4 * 64, 4)
    # every layer's activations -> every layer's input (fp32 here) plus one layer recomputed during the backward
    assert full - ckpt == 8 * layer - (8 * 4 * 64 * shape.hidden * 4 + layer)


def test_a_zeroth_order_forward_keeps_one_layer_not_every_layer():
    shallow = model_shape(LlamaConfig(**{**CFG, "num_hidden_layers": 2}))
    deep = model_shape(LlamaConfig(**{**CFG, "num_hidden_layers": 16}))
    assert inference_activation_bytes(shallow, 8, 64, 4) == inference_activation_bytes(deep, 8, 64, 4)
    fo = Setting(method="adamw", batch=8, seq=64)
    layer = _stored_per_layer(deep, fo, 8 * 64, 4)
    assert stored_activation_bytes(deep, fo, 8, 64) - stored_activation_bytes(shallow, fo, 8, 64) == 14 * layer
    zo = estimate(deep, method="mezo", batch=8, seq=64)
    assert not any("gradient" in k or "optimizer" in k for k in list(zo.gpu) + list(zo.train))


# ---- optimizer state: the plan's count equals the real optimizer's after one step ---------------------------------------


def _state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if torch.is_tensor(t))


def _one_step(model, optimizer):
    ids = torch.randint(0, CFG["vocab_size"], (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adamw_state_equals_torch_adamw_after_one_step(dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).to(getattr(torch, dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # what HF's optim adamw_torch builds
    _one_step(model, opt)
    est = estimate(model_shape(LlamaConfig(**CFG)), method="adamw", dtype=dtype, batch=2, seq=16)
    # moments in the weights' dtype: HF runs AdamW on bf16 weights without an fp32 copy
    assert est.gpu["optimizer state (AdamW)"] == _state_bytes(opt)
    assert est.step["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())


def test_lora_adamw_state_equals_torch_adamw_after_one_step():
    from peft import LoraConfig, get_peft_model

    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**CFG)).to(torch.bfloat16), LoraConfig(**lora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _one_step(model, opt)
    est = estimate(model_shape(LlamaConfig(**CFG), lora=lora), method="adamw", lora=True, dtype="bfloat16")
    assert est.gpu["optimizer state (AdamW)"] == _state_bytes(opt)  # peft keeps the adapters in fp32
    assert est.gpu["LoRA adapters (fp32)"] == sum(p.numel() * p.element_size() for p in model.parameters()
                                                  if p.requires_grad)


@pytest.mark.parametrize("history", [0, 3])
def test_natural_galore_state_equals_the_real_optimizer_after_one_step(history):
    from zoft.optim.natural_galore import NaturalGaLore, natural_galore_param_groups

    galore = {"rank": 4, "history": history, "target_modules": "all-linear"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    opt = NaturalGaLore(natural_galore_param_groups(model, rank=4, history=history), lr=1e-3)
    _one_step(model, opt)
    est = estimate(model_shape(LlamaConfig(**CFG)), method="natural_galore", galore=galore, batch=2, seq=16)
    adamw = estimate(model_shape(LlamaConfig(**CFG)), method="adamw", batch=2, seq=16)
    assert est.gpu["optimizer state (Natural GaLore)"] == _state_bytes(opt)
    assert est.gpu["optimizer state (Natural GaLore)"] != adamw.gpu["optimizer state (AdamW)"]


# ---- fp32 masters: method.master_weights and offload.storage_dtype --------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("master_weights", ["auto", "fp32", "none"])
def test_planned_masters_equal_the_masters_zoft_keeps(dtype, master_weights):
    from zoft.zo.perturb import ZOParameters

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).to(getattr(torch, dtype))
    zo = ZOParameters(model, 0, master_weights=master_weights)
    real = sum(t.numel() * t.element_size() for t in zo.masters.values())
    est = estimate(model_shape(LlamaConfig(**CFG)), method="mezo", dtype=dtype, master_weights=master_weights)
    assert _masters(est) == real
    # the optimizer's state_dict (accelerate prepares the optimizer through it) holds a clone of them
    from zoft.zo.mezo import MeZOOptimizer

    cloned = MeZOOptimizer(zo, lr=1e-3).state_dict()["zo_masters"]
    copy = sum(v for k, v in est.step.items() if "copy" in k)
    assert copy == sum(t.numel() * t.element_size() for t in cloned.values())


def test_master_weights_none_changes_the_plan_and_auto_is_one_function():
    shape = model_shape(LlamaConfig(**CFG))
    auto = estimate(shape, method="mezo", dtype="bfloat16", offload=True)
    none = estimate(shape, method="mezo", dtype="bfloat16", offload=True, master_weights="none")
    fp32 = estimate(shape, method="mezo", dtype="bfloat16", offload=True, master_weights="fp32")
    n = shape.total_params
    assert _masters(none) == 0 and _masters(fp32) == 4 * n
    assert _masters(auto) == _master_bytes_per_param("auto", 2) * n  # the one place 'auto' is decided
    # offload: the blocks' masters live beside the stored blocks on the host, the rest on the device
    assert fp32.cpu["fp32 masters (blocks)"] == 4 * shape.block_params
    assert fp32.gpu["fp32 masters"] == 4 * (n - shape.block_params)
    assert none.cpu_total < fp32.cpu_total
    # 16-bit block storage updates the resident fp32 copy: no masters whatever master_weights says
    stored = estimate(shape, method="mezo", offload=True, storage_dtype="bfloat16", master_weights="auto")
    assert _masters(stored) == 0 and stored.cpu["weights (offloaded blocks)"] == 2 * shape.block_params


def test_offload_keeps_two_blocks_resident_and_plans_the_paired_forward():
    shape = model_shape(LlamaConfig(**CFG))
    n, blocks, one = shape.total_params, shape.block_params, shape.largest_block_params
    off = estimate(shape, method="mezo", offload=True, batch=2, seq=16)
    two = estimate(shape, method="mezo", offload=True, paired=False, batch=2, seq=16)
    assert off.gpu["weights (resident: outside blocks + 2 blocks)"] == (n - blocks + 2 * one) * 4
    assert off.cpu["weights (offloaded blocks)"] == blocks * 4
    assert off.train["activations (paired: doubled batch)"] == inference_activation_bytes(shape, 4, 16, 4)
    assert two.train["activations (one layer's working set)"] == inference_activation_bytes(shape, 2, 16, 4)
    stored = estimate(shape, method="mezo", offload=True, storage_dtype="bfloat16", batch=2, seq=16)
    assert stored.label == "mezo full + offload (bfloat16 storage)"
    assert stored.gpu["upload staging (one block)"] == 2 * one


def test_loading_holds_the_checkpoint_and_a_converted_copy():
    shape = model_shape(LlamaConfig(**CFG, dtype="float32"))
    n = shape.total_params
    same = estimate(shape, method="mezo", dtype="float32")
    bf16 = estimate(shape, method="mezo", dtype="bfloat16", master_weights="none")
    assert same.load_peak == 4 * n and bf16.load_peak == 6 * n  # the fp32 file, and its bf16 copy
    assert bf16.host_peak == 6 * n  # on a GPU machine, loading is the host's peak

# ---- QZO and Addax ---------------------------------------------------------------------------------------------------


def test_qzo_rows_equal_the_bytes_of_a_model_quantized_by_prepare_qzo_model():
    from zoft.zo.qzo import prepare_qzo_model

    for cfg, targets in [(CFG, "all-linear"), ({**CFG, "tie_word_embeddings": False}, ["q_proj", "down_proj"])]:
        shape = model_shape(LlamaConfig(**cfg), nf4_target_modules=targets)
        est = estimate(shape, method="qzo", batch=2, seq=16, nf4_blocksize=32)
        torch.manual_seed(0)
        real = LlamaForCausalLM(LlamaConfig(**cfg))
        trained = prepare_qzo_model(real, "nf4", blocksize=32, target_modules=targets)
        codes = sum(t.numel() for n, t in real.named_buffers() if n.endswith(".codes"))
        scales = sum(p.numel() for p in real.parameters() if p.requires_grad)
        rest = sum(p.numel() * p.element_size() for p in real.parameters()) - 4 * scales
        assert est.label == "qzo NF4" and len(trained) > 0
        assert est.gpu["weights (NF4 codes)"] == codes
        assert est.gpu["weights (fp32 scales, trained)"] == 4 * scales
        assert est.gpu["weights (not quantized)"] == rest
        assert _masters(est) == 0 and "gradients" not in est.train and not any("optimizer" in k for k in est.gpu)


def test_addax_keeps_one_gradient_and_the_larger_of_its_two_activation_sets():
    shape = model_shape(LlamaConfig(**CFG))
    common = dict(method="addax", batch=4, seq=64)
    long_heavy = estimate(shape, addax=(8, 2, 16), **common)
    short_heavy = estimate(shape, addax=(1, 16, 48), **common)
    assert long_heavy.train["gradients (one tensor at a time)"] == 4 * shape.largest_tensor
    key = "activations (max of ZO long / FO short batch)"
    assert long_heavy.train[key] == inference_activation_bytes(shape, 8, 64, 4)
    assert short_heavy.train[key] == stored_activation_bytes(shape, Setting(**common), 16, 48)
    assert long_heavy.gpu_total < estimate(shape, method="adamw", batch=4, seq=64).gpu_total


# ---- published figures, from configs on the meta device --------------------------------------------------------------------


def _opt(hidden, ffn, layers, heads):
    return OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=hidden, dtype="float16")


@pytest.fixture(scope="module")
def opt_shapes():
    # the OPT paper's (Zhang et al., 2022, Table 1) hyperparameters
    sizes = {"2.7b": (2560, 10240, 32, 32), "6.7b": (4096, 16384, 32, 32), "30b": (7168, 28672, 48, 56),
             "66b": (9216, 36864, 64, 72), "175b": (12288, 49152, 96, 96)}
    return {k: model_shape(_opt(*v)) for k, v in sizes.items()}


@pytest.mark.parametrize("batch", [1, 16])
def test_mezo_paper_one_80gb_gpu_holds_mezo_on_opt_30b_and_adam_only_up_to_2_7b(opt_shapes, batch):
    # MeZO (Malladi et al., 2023): one A100 80GB trains OPT-30B with MeZO (fp16, no masters, as MeZO runs it),
    # full fine-tuning with Adam only up to OPT-2.7B. MultiRC, ~400 tokens per example; batch 1 (memory
    # profile) and 16 (the MeZO repository's mezo.sh). Adam is the paper's fp32 fine-tuning.
    gpu = 80 * GiB
    mezo = dict(method="mezo", dtype="float16", batch=batch, seq=400, master_weights="none", z_generator="philox")
    assert estimate(opt_shapes["30b"], **mezo).gpu_total < gpu
    assert estimate(opt_shapes["66b"], **mezo).gpu_total > gpu
    adam = dict(method="adamw", dtype="float32", batch=batch, seq=400)
    assert estimate(opt_shapes["2.7b"], **adam).gpu_total < gpu
    assert estimate(opt_shapes["6.7b"], **adam).gpu_total > gpu


def test_zo2_paper_opt_175b_in_18gb_of_gpu_and_host_memory_about_the_fp16_model(opt_shapes):
    # ZO2 (Wang et al., 2025), README table: OPT-175B fp16, batch 1 x 2048 tokens (test/mezo_sgd/hf_opt
    # defaults), 18.04 GB of GPU memory; host memory holds the fp16 model (no fp32 masters).
    shape = opt_shapes["175b"]
    est = estimate(shape, method="mezo", dtype="float16", offload=True, batch=1, seq=2048, master_weights="none",
                   z_generator="philox")
    assert est.gpu_total == pytest.approx(18.04 * GiB, rel=0.15)
    assert est.host_peak == pytest.approx(shape.total_params * 2, rel=0.15)


def test_qzo_paper_a_13b_model_within_a_24gb_gpu():
    # QZO (Shang et al., 2025): Llama-2-13B in 4 bits fine-tuned within one 24GB GPU (memory profile on SST-2,
    # batch 1; 256 tokens here, above SST-2's prompts). Llama-2-13B: hidden 5120, MLP 13824, 40 layers and heads.
    config = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                         num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16")
    shape = model_shape(config)
    common = dict(dtype="bfloat16", batch=1, seq=256, z_generator="philox", master_weights="none")
    assert estimate(shape, method="qzo", **common).gpu_total < 24 * GiB
    assert estimate(shape, method="mezo", **common).gpu_total > 24 * GiB  # the bf16 weights alone do not fit


# ---- the command line -------------------------------------------------------------------------------------------------------


def test_sizes_parse_and_a_malformed_size_is_one_line():
    from zoft.plan import parse_size

    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == parse_size("80G") == 80 * GiB
    assert parse_size("256g") == 256 * GiB and parse_size("1.5TB") == 15 * 10**11
    for bad in ("80XB", "GB", "-3GB", "0GB", "eighty"):
        with pytest.raises(ZoftError, match=r"is not a memory size; write a number and a unit") as e:
            parse_size(bad, "--gpu-memory")
        assert "\n" not in str(e.value) and str(e.value).startswith("--gpu-memory: ")


def _recipe_file(tmp_path, tiny_llama_dir, sentiment_csv, **sections):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "out", **sections)))
    return str(path)


def test_cli_plan_prints_the_table_and_honours_master_weights(tiny_llama_dir, sentiment_csv, tmp_path, capsys):
    from zoft.cli import main

    path = _recipe_file(tmp_path, tiny_llama_dir, sentiment_csv)
    assert main(["plan", path, "offload=cpu", "model.dtype=bfloat16", "--gpu-memory", "80GB"]) == 0
    auto = capsys.readouterr().out
    assert auto.startswith("zoft plan: mezo full + offload, bfloat16")
    assert "| mezo + LoRA + offload, bfloat16 | peft: {method: lora} |" in auto
    assert main(["plan", path, "offload=cpu", "model.dtype=bfloat16", "method.master_weights=none",
                 "--gpu-memory", "80GB"]) == 0
    none = capsys.readouterr().out
    assert "fp32 masters" not in none and ("fp32 masters" in auto) == bool(_master_bytes_per_param("auto", 2))
    assert main(["plan", path, "offload.storage_dtype=bfloat16", "--gpu-memory", "80GiB"]) == 0
    assert capsys.readouterr().out.startswith("zoft plan: mezo full + offload (bfloat16 storage)")


def _overrides(change):
    """`a.b: 1, c: {d: e}` -> ["a.b=1", "c={d: e}"]: a plan's change, as command-line overrides."""
    parts, depth, cur = [], 0, ""
    for ch in change + ",":
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            key, _, value = cur.strip().partition(": ")
            parts.append(f"{key}={value}")
            cur = ""
        else:
            cur += ch
    return parts


def test_cli_plan_that_does_not_fit_names_the_change_that_would(tiny_llama_dir, sentiment_csv, tmp_path, capsys):
    from zoft.cli import main
    from zoft.config import load_recipe
    from zoft.plan import plan_of_recipe

    path = _recipe_file(tmp_path, tiny_llama_dir, sentiment_csv, method={"name": "adamw"},
                        train={"per_device_train_batch_size": 16})
    plan = plan_of_recipe(load_recipe(path), cuda=True)
    mezo = next(e for e in plan.alternatives if e.change == "method.name: mezo")
    gpu = (mezo.gpu_total + plan.chosen.gpu_total) // 2  # room for MeZO, not for AdamW
    assert main(["plan", path, "--gpu-memory", str(gpu), "--cpu-memory", "64GB"]) == 0
    out = capsys.readouterr().out
    assert "verdict: adamw full does not fit (needs about" in out
    fitting = [e for e in plan.alternatives if e.gpu_total <= gpu]
    assert mezo in fitting and all(f"{e.label}: set `{e.change}`" in out for e in fitting)
    best = fitting[0]
    assert f"recommendation: {best.label} fits: set `{best.change}` in the recipe" in out
    # the named change, made to the recipe, is the setting that was planned
    changed = plan_of_recipe(load_recipe(path, _overrides(best.change)), cuda=True).chosen
    assert changed.gpu_total == best.gpu_total <= gpu
    assert main(["plan", path, "--gpu-memory", "1KiB", "--cpu-memory", "64GB"]) == 0
    assert "recommendation: none of these settings fits, at any batch size" in capsys.readouterr().out


def test_cli_malformed_memory_size_is_one_line(tiny_llama_dir, sentiment_csv, tmp_path, capsys):
    from zoft.cli import main

    path = _recipe_file(tmp_path, tiny_llama_dir, sentiment_csv)
    assert main(["plan", path, "--gpu-memory", "80 gigs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zoft: error: --gpu-memory: '80 gigs' is not a memory size; write a number and a unit, e.g. 80GB "
                   "(10^9 bytes), 80GiB or 80G (2^30 bytes), 512MiB, 1.5TB"]


def test_cli_plan_of_qzo_and_addax_recipes(tiny_llama_dir, sentiment_csv, tmp_path, capsys):
    from zoft.cli import main

    path = _recipe_file(tmp_path, tiny_llama_dir, sentiment_csv)
    assert main(["plan", path, "method.name=qzo", "model.quantization=nf4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("zoft plan: qzo NF4\n") and "| weights (NF4 codes) |" in out
    assert main(["plan", path, "method.name=addax", "method.length_threshold=16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("zoft plan: addax full\n") and "| gradients (one tensor at a time) [training step] |" in out


def test_launch_size_multiplies_the_host_memory_of_the_machine(tiny_llama_dir, sentiment_csv, tmp_path):
    from zoft.config import load_recipe
    from zoft.plan import plan_of_recipe

    recipe = load_recipe(_recipe_file(tmp_path, tiny_llama_dir, sentiment_csv, offload="cpu"))
    one = plan_of_recipe(recipe, processes=1, cuda=True).chosen
    four = plan_of_recipe(recipe, processes=4, cuda=True).chosen
    assert one.host_peak == four.host_peak  # per process
    assert four.fits(10**12, 4 * four.host_peak, cuda=True) and not four.fits(10**12, 4 * four.host_peak - 1, cuda=True)


def test_offload_preflight_in_train_uses_the_plans_host_memory(tiny_llama_dir, sentiment_csv, tmp_path, monkeypatch):
    from zoft import plan, run
    from zoft.config import load_recipe

    recipe = load_recipe(_recipe_file(tmp_path, tiny_llama_dir, sentiment_csv, offload="cpu",
                                      model={"name": tiny_llama_dir, "dtype": "bfloat16"}))
    needed = plan.host_bytes_per_process(recipe)
    shape = plan.plan_of_recipe(recipe, processes=1).shape
    # the fp32 checkpoint mapped while the bf16 copy is made: more than the bf16 weights main counted
    assert needed >= 6 * shape.total_params > 2 * shape.total_params
    run.prepare_output_dir(recipe)
    monkeypatch.setattr(plan, "_cpu_available", lambda: needed - 1)  # a machine one byte short
    with pytest.raises(ZoftError, match=r"^offload: the model needs about .* GiB of CPU memory"):
        run.build_trainer(recipe)
    monkeypatch.setattr(plan, "_cpu_available", lambda: needed)  # exactly enough: the check passes
    assert run.build_trainer(recipe).model is not None
