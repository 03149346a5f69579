"""`zoft export`: LoRA runs merge into the base, QZO runs dequantize, the result loads with plain transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, tiny_recipe
from safetensors.torch import load_file

from zoft import run
from zoft.cli import main
from zoft.config import recipe_to_yaml, validate_recipe

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
IDS = torch.tensor([[1, 15, 200, 3000, 42, 7, 99, 512, 8, 1000], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
LORA = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _export(*args):
    """Run `zoft export` in process; returns (exit code, stdout, stderr lines)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *map(str, args)])
    return code, out.getvalue(), err.getvalue().strip().splitlines()


def _weights(folder):
    state = {}
    for f in Path(folder).glob("*.safetensors"):
        state.update(load_file(str(f)))
    return state


def _load_plain(folder, tmp_path):
    """Load `folder` in a fresh interpreter with transformers only; returns its logits on IDS."""
    out = tmp_path / "plain_logits.pt"
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(folder)!r})
assert tok("great")["input_ids"], "tokenizer"
with torch.no_grad():
    logits = model(torch.tensor({IDS.tolist()!r})).logits
assert "zoft" not in sys.modules and "peft" not in sys.modules and "bitsandbytes" not in sys.modules, sorted(
    m for m in ("zoft", "peft", "bitsandbytes") if m in sys.modules)
torch.save({{"logits": logits, "dtype": str(next(model.parameters()).dtype)}}, {str(out)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_lora_run_export_equals_peft_merge_and_loads_without_zoft_or_peft(tiny_llama_dir, sentiment_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    recipe = validate_recipe(tiny_recipe(
        tiny_llama_dir, sentiment_csv, run_dir, method={"name": "adamw"}, peft=LORA,
        train={"learning_rate": 1e-2, "max_steps": 3, "save_steps": 3},
    ))
    run.train(recipe)

    code, stdout, err = _export(run_dir, "--out", tmp_path / "merged")
    assert code == 0, err
    assert stdout.strip() == (
        f"zoft: merged 6 LoRA layers into {tiny_llama_dir}; wrote a float32 Hugging Face checkpoint to "
        f"{tmp_path / 'merged'}"
    )
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.startswith("adapter") for name in files)

    # Reference: peft's own model, unmerged (forward through the adapters) and merged.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
    reference = peft_model.merge_and_unload().state_dict()
    exported = _weights(tmp_path / "merged")
    assert set(exported) == {k for k in reference if k != "lm_head.weight"}  # tied head stored once
    changed = set()
    for k, v in exported.items():
        assert torch.equal(v, reference[k]), k
        if not torch.equal(v, base_state[k]):
            changed.add(k.rsplit(".", 2)[-2])
    assert changed == {"q_proj", "v_proj", "down_proj"}  # exactly the adapted layers moved

    plain = _load_plain(tmp_path / "merged", tmp_path)
    assert plain["dtype"] == "torch.float32"
    torch.testing.assert_close(plain["logits"], unmerged, rtol=1e-5, atol=1e-5)
    assert (plain["logits"] - AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(IDS).logits).abs().max() > 1e-3

    # --dtype bfloat16: the same merged weights, cast once at the end.
    code, stdout, err = _export(run_dir, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    half = _weights(tmp_path / "bf16")
    assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in exported.items())

    # An existing --out is refused unless --overwrite, and the refused folder is left as it was.
    code, _, err = _export(run_dir, "--out", tmp_path / "bf16")
    assert code == 2 and err == [
        f"zoft: error: --out: {tmp_path / 'bf16'} already exists and is not empty; choose another folder "
        "or pass --overwrite"
    ]
    assert torch.equal(_weights(tmp_path / "bf16")["model.embed_tokens.weight"], half["model.embed_tokens.weight"])
    code, _, err = _export(run_dir, "--out", tmp_path / "bf16", "--overwrite")
    assert code == 0, err
    assert _weights(tmp_path / "bf16")["model.embed_tokens.weight"].dtype == torch.float32  # replaced
    assert not list(tmp_path.glob(".*zoft-export-partial"))
    # A checkpoint of the run exports too (its recipe is the parent run's).
    code, _, err = _export(run_dir / "checkpoint-3", "--out", tmp_path / "ckpt")
    assert code == 0, err
    assert all(torch.equal(_weights(tmp_path / "ckpt")[k], v) for k, v in exported.items())


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory, tokenizer_dir):
    # hidden 64: bitsandbytes' CPU kernel (the reference below) needs in_features >= blocksize 64.
    return make_tiny_llama(tmp_path_factory.mktemp("llama64"), tokenizer_dir, hidden=64)


def test_qzo_run_export_equals_the_dequantized_nf4_model_in_the_recipes_dtype(llama64_dir, sentiment_csv, tmp_path):
    pytest.importorskip("bitsandbytes")
    from zoft.zo import quant4bit as q4

    run_dir = tmp_path / "qzo"
    recipe = validate_recipe(tiny_recipe(
        llama64_dir, sentiment_csv, run_dir,
        model={"name": llama64_dir, "quantization": "nf4", "dtype": "bfloat16"},
        method={"name": "qzo", "eps": 1e-2, "clip_projected_grad": 1.0},
        train={"learning_rate": 0.05, "max_steps": 2, "save_strategy": "no"},
    ))
    run.train(recipe)
    # The run's own model: the base built as the run built it, with the saved (tuned) scales loaded.
    base, _ = run.build_model_and_tokenizer(recipe)
    trained, _ = run.build_model_and_tokenizer(recipe)
    assert not trained.load_state_dict(_weights(run_dir), strict=False).unexpected_keys
    trained.eval()
    moved = max((a.absmax - b.absmax).abs().max().item() for a, b in zip(q4.nf4_layers(trained), q4.nf4_layers(base)))
    assert moved > 1e-4  # the run tuned the scales

    code, stdout, err = _export(run_dir, "--out", tmp_path / "bf16")
    assert code == 0, err
    assert "dequantized 14 NF4 layers; wrote a bfloat16 Hugging Face checkpoint" in stdout
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    exported = _weights(tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 for v in exported.values())
    layer = trained.model.layers[1].mlp.down_proj  # the weight is the tuned NF4 layer's own product
    assert torch.equal(exported["model.layers.1.mlp.down_proj.weight"], layer.dequantized_weight(torch.bfloat16))

    # The exported model computes exactly what the trained NF4 model computes, in the recipe's dtype.
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = trained(IDS).logits
        same_process = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()(IDS).logits
    assert expected.dtype == torch.bfloat16 and torch.equal(same_process, expected)
    plain = _load_plain(tmp_path / "bf16", tmp_path)
    assert plain["dtype"] == "torch.bfloat16"
    torch.testing.assert_close(plain["logits"], expected, rtol=0, atol=1e-2)  # bf16 kernels vary with threads

    # --dtype float32 against the saved folder loaded through bitsandbytes and converted to NF4Linear layers
    # (a second reader of the same checkpoint), computing in float32.
    code, _, err = _export(run_dir, "--out", tmp_path / "fp32", "--dtype", "float32")
    assert code == 0, err
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32")).eval()(IDS).logits
        nf4_fp32 = q4.load_quantized(str(run_dir), dtype=torch.float32).eval()(IDS).logits
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, nf4_fp32, rtol=1e-6, atol=1e-6)


def test_qlora_adapter_on_a_4bit_base_merges_into_the_dequantized_base(llama64_dir, tmp_path):
    """An adapter trained on a bitsandbytes 4-bit base (QLoRA) merges into the dequantized base weights."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoft.zo import quant4bit as q4

    model = AutoModelForCausalLM.from_pretrained(llama64_dir)
    q4.quantize_model_nf4(model)
    q4.save_quantized(model, tmp_path / "nf4", AutoTokenizer.from_pretrained(llama64_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"), dtype=torch.float32)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    # Inputs that require grad: bitsandbytes' CPU kernel rounds the scales to bf16 on its inference path
    # (see zoft/zo/quant4bit.py), and under peft the frozen base would otherwise take it.
    embeds = peft_model.get_input_embeddings()(IDS).detach().requires_grad_(True)
    expected = peft_model(inputs_embeds=embeds).logits.detach()

    code, stdout, err = _export(tmp_path / "adapter", "--out", tmp_path / "merged")
    assert code == 0, err
    assert f"merged 4 LoRA layers into {tmp_path / 'nf4'}; wrote a float32" in stdout
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _adapter(model_dir, folder, **kwargs):
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if kwargs.get("prefix") else LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(folder))
    return folder


def test_export_errors_are_one_line(tiny_llama_dir, sentiment_csv, tokenizer_dir, tmp_path):
    def error(*args):
        code, _, err = _export(*args)
        lines = [line for line in err if "Loading weights" not in line]  # transformers' progress bar
        assert code == 2 and len(lines) == 1 and "Traceback" not in "".join(err), err
        return lines[0]

    missing = tmp_path / "nope"
    assert error(missing, "--out", tmp_path / "o") == (
        f"zoft: error: {missing}: not found; give a zoft run folder (with recipe.yaml) or a LoRA adapter folder"
    )
    (tmp_path / "empty").mkdir()
    assert error(tmp_path / "empty", "--out", tmp_path / "o") == (
        f"zoft: error: {tmp_path / 'empty'}: no adapter_config.json or config.json: nothing to export; "
        "it is not a run folder either"
    )
    # A run folder whose run saved no model.
    nosave = tmp_path / "nosave"
    nosave.mkdir()
    (nosave / "recipe.yaml").write_text(recipe_to_yaml(validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, nosave))))
    assert error(nosave, "--out", tmp_path / "o") == (
        f"zoft: error: {nosave}: no adapter_config.json or config.json: nothing to export; the run saved no model "
        "(output.save_model false, or it has not finished); export one of its checkpoint-N folders"
    )
    # --out that holds the source, even with --overwrite.
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
    assert error(adapter, "--out", adapter, "--overwrite") == (
        f"zoft: error: --out: {adapter} holds the folder being exported; choose a folder outside {adapter}"
    )
    assert error(adapter, "--out", tmp_path, "--overwrite").startswith(f"zoft: error: --out: {tmp_path} holds the folder")
    # Prefix tuning cannot be merged.
    prefix = _adapter(tiny_llama_dir, tmp_path / "prefix", prefix=True)
    assert error(prefix, "--out", tmp_path / "o") == (
        f"zoft: error: {prefix}: a PREFIX_TUNING adapter cannot be merged into the weights (only LoRA can); "
        "load it with peft's PeftModel instead"
    )
    # An adapter on a base of another shape.
    other = make_tiny_llama(tmp_path / "wide", tokenizer_dir, hidden=64)
    assert error(adapter, "--out", tmp_path / "o", "--base", other).startswith(
        f"zoft: error: {adapter}: the adapter does not fit base model '{other}': size mismatch for "
    )
    # A LoRA-GA run's checkpoint holds the adapter of the offset base: refused, the run folder is the fix.
    ga_run = tmp_path / "ga"
    (ga_run / "checkpoint-2").mkdir(parents=True)
    ga = tiny_recipe(tiny_llama_dir, sentiment_csv, ga_run, method={"name": "adamw"},
                     peft={"method": "lora", "init": "lora_ga"})
    (ga_run / "recipe.yaml").write_text(recipe_to_yaml(validate_recipe(ga)))
    (ga_run / "checkpoint-2" / "adapter_config.json").write_text(
        (adapter / "adapter_config.json").read_text())
    assert error(ga_run / "checkpoint-2", "--out", tmp_path / "o") == (
        f"zoft: error: {ga_run / 'checkpoint-2'}: a LoRA-GA checkpoint's adapter fits the offset base of the "
        f"running job, not the original model; export the run folder {ga_run} (its final adapter is converted)"
    )
    assert not (tmp_path / "o").exists()


def test_adapter_folder_without_a_recipe_merges_onto_the_base_it_names(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
    code, stdout, err = _export(adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    assert f"merged 2 LoRA layers into {tiny_llama_dir}" in stdout
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(adapter))(IDS)
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))(IDS)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
