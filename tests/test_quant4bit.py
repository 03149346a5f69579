"""NF4Linear (QZO's quantized layer) against bitsandbytes, the plain dequantize-then-matmul reference,
and a save/load round trip through plain transformers."""

import json

import conftest
import pytest
import torch
from torch import nn

from zoft.errors import ZoftError
from zoft.zo import quant4bit as q

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

torch.set_num_threads(2)


def tiny_llama(tie: bool = False, seed: int = 0):
    return conftest.tiny_llama(seed, tie_word_embeddings=tie).eval()


def bnb_reference_weight(layer: q.NF4Linear, absmax: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """bitsandbytes' own dequantization of the layer's codes with the given scales."""
    state = bnbf.QuantState(
        absmax=absmax.detach().float(),
        shape=torch.Size([layer.out_features, layer.in_features]),
        code=bnbf.get_4bit_type("nf4", device="cpu"),
        blocksize=layer.blocksize,
        quant_type="nf4",
        dtype=dtype,
    )
    return bnbf.dequantize_4bit(layer.codes, state)


class SwapScales:
    """What the MeZO engine does: a pre-hook swaps p + eps * z in for the forward, a hook swaps p back."""

    def __init__(self, model: nn.Module, eps: float, seed: int):
        self.handles = []
        for name, layer in model.named_modules():
            if isinstance(layer, q.NF4Linear):
                gen = torch.Generator().manual_seed(seed + hash(name) % 10_000)
                z = torch.randn(layer.absmax.shape, generator=gen)
                self.handles.append(layer.register_forward_pre_hook(self._pre(eps * z)))
                self.handles.append(layer.register_forward_hook(self._post))

    @staticmethod
    def _pre(delta):
        def hook(module, args):
            module._zo_saved = module._parameters["absmax"]
            module._parameters["absmax"] = module._zo_saved + delta

        return hook

    @staticmethod
    def _post(module, args, out):
        module._parameters["absmax"] = module._zo_saved
        del module._zo_saved

    def remove(self):
        for h in self.handles:
            h.remove()


# (a) storage format: bit-identical to bitsandbytes ------------------------------------------------


def test_nf4_levels_are_bitsandbytes_levels():
    assert torch.equal(q.nf4_table(), bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (5, 12)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_and_dequantize_match_bitsandbytes(shape, blocksize):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.05
    codes, absmax = q.nf4_quantize_torch(w, blocksize)
    ref_codes, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, state.absmax)
    # The public quantizer (bitsandbytes when installed) agrees with the plain-torch one.
    codes2, absmax2 = q.nf4_quantize(w, blocksize)
    assert torch.equal(codes2, codes) and torch.equal(absmax2, absmax)
    assert torch.equal(
        q.nf4_dequantize(codes, absmax, shape, blocksize), bnbf.dequantize_4bit(ref_codes, state)
    )
    assert torch.equal(
        q.nf4_dequantize(codes, absmax, shape, blocksize, torch.bfloat16),
        bnbf.dequantize_4bit(ref_codes, state).to(torch.bfloat16),
    )


def test_quantizer_breaks_ties_like_bitsandbytes():
    # Values exactly on the midpoints between NF4 levels (block absmax 1.0, so scaling is exact).
    levels = q.nf4_table()
    mids = (levels[:-1] + levels[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(64 - 1 - 2 * 15)]).reshape(1, 64)
    codes, absmax = q.nf4_quantize_torch(w)
    ref_codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, state.absmax)


def test_nibble_order_first_value_in_high_nibble():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = -1.0, 1.0  # codes 0 and 15
    codes, _ = q.nf4_quantize_torch(w)
    assert codes[0, 0].item() == 0x0F
    assert codes[1, 0].item() == 0x77  # two zeros: level 7


# (b) forward with perturbed scales = dequantize-then-matmul --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_with_perturbed_scales_matches_reference(dtype):
    torch.manual_seed(2)
    lin = nn.Linear(128, 48)
    layer = q.NF4Linear.from_linear(lin)
    x = torch.randn(4, 7, 128, dtype=dtype)
    z = torch.randn(layer.absmax.shape)
    perturbed = layer.absmax.detach() + 1e-3 * z
    layer._parameters["absmax"] = nn.Parameter(perturbed)
    out = layer(x)
    ref = nn.functional.linear(
        x, bnb_reference_weight(layer, perturbed, torch.float32).to(dtype), lin.bias.to(dtype)
    )
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    # The perturbation reaches the output (a forward that cached the weight would not see it).
    unperturbed = nn.functional.linear(
        x, bnb_reference_weight(layer, perturbed - 1e-3 * z).to(dtype), lin.bias.to(dtype)
    )
    assert not torch.equal(out, unperturbed)


def test_scale_gradient_matches_reference():
    # d out / d absmax through the layer equals autograd through the reference weight (codes fixed).
    torch.manual_seed(3)
    layer = q.NF4Linear.from_linear(nn.Linear(64, 32, bias=False))
    x = torch.randn(5, 64)
    layer(x).square().sum().backward()
    a = layer.absmax.detach().clone().requires_grad_(True)
    levels = bnb_reference_weight(layer, torch.ones_like(a)).reshape(-1, 64)
    w = (levels * a[:, None]).reshape(32, 64)
    nn.functional.linear(x, w).square().sum().backward()
    torch.testing.assert_close(layer.absmax.grad, a.grad)


# (c) a simulated ZO cycle: codes never change, scales stay positive, perturb/restore is exact ------


def test_zo_cycle_keeps_codes_and_restores_scales_exactly():
    model = tiny_llama()
    q.quantize_model_nf4(model)
    q.mark_only_scales_trainable(model)
    layers = q.nf4_layers(model)
    codes0 = [m.codes.clone() for m in layers]
    scales0 = [m.absmax.detach().clone() for m in layers]
    x = torch.randint(0, 128, (2, 9))
    base = model(x).logits.detach()

    outs = []
    for sign in (+1, -1):
        swap = SwapScales(model, sign * 1e-3, seed=7)
        outs.append(model(x).logits.detach())
        swap.remove()
    assert not torch.equal(outs[0], outs[1])
    for m, s in zip(layers, scales0):
        assert torch.equal(m.absmax, s)  # stored values never changed
    assert torch.equal(model(x).logits, base)

    # An update big enough to push scales negative; constrain_ brings them back above the floor.
    with torch.no_grad():
        for m in layers:
            m.absmax.sub_(
                2.0
                * m.absmax.abs().max()
                * torch.rand(m.absmax.shape, generator=torch.Generator().manual_seed(0))
            )
    assert any((m.absmax <= 0).any() for m in layers)
    q.constrain_scales_(model)
    for m in layers:
        assert (m.absmax >= q.DEFAULT_MIN_SCALE).all()
    for m, c in zip(layers, codes0):
        assert torch.equal(m.codes, c)


def test_only_scales_are_trainable_and_stay_fp32_under_bf16_cast():
    model = tiny_llama()
    names = q.quantize_model_nf4(model)
    trainable = q.mark_only_scales_trainable(model)
    assert trainable == [n + ".absmax" for n in names]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    scales = [m.absmax.detach().clone() for m in q.nf4_layers(model)]
    model.to(torch.bfloat16)
    for m, s in zip(q.nf4_layers(model), scales):
        assert m.absmax.dtype == torch.float32 and torch.equal(m.absmax, s)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 128, (1, 5))).logits.dtype == torch.bfloat16


def test_qzo_on_unquantized_model_and_no_match_are_one_line_errors():
    model = tiny_llama()
    with pytest.raises(ZoftError, match="no NF4 layer"):
        q.mark_only_scales_trainable(model)
    with pytest.raises(ZoftError, match="no nn.Linear layer matched"):
        q.quantize_model_nf4(model, target_modules=["does_not_exist"])
    with pytest.raises(ZoftError, match="blocksize"):
        q.quantize_model_nf4(model, blocksize=48)


# (d) save -> load ---------------------------------------------------------------------------------


def test_save_load_round_trip_reproduces_tuned_model(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    q.quantize_model_nf4(model)
    with torch.no_grad():  # "tuned" scales that a fresh quantization would not give
        for i, m in enumerate(q.nf4_layers(model)):
            m.absmax.mul_(1.0 + 0.01 * (i + 1))
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = model(x).logits
    q.save_quantized(model, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert config["llm_int8_skip_modules"] == ["lm_head"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    layer0 = model.model.layers[0].self_attn.q_proj
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight.absmax"], layer0.absmax.detach())
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], layer0.codes)

    # zoft loader: same layers, identical outputs.
    reloaded = q.load_quantized(tmp_path)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, q.NF4Linear)
    assert reloaded.hf_quantizer is None
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)

    # Loading with a bf16 compute dtype keeps the tuned scales fp32 and exact.
    half = q.load_quantized(tmp_path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(half.model.layers[0].self_attn.q_proj.absmax, layer0.absmax.detach())

    # Plain transformers + bitsandbytes (no zoft): Linear4bit layers holding the tuned scales.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    bnb_layer = plain.model.layers[0].self_attn.q_proj
    assert isinstance(bnb_layer, bnb.nn.Linear4bit)
    assert torch.equal(bnb_layer.weight.quant_state.absmax, layer0.absmax.detach())
    torch.testing.assert_close(plain(x).logits.detach(), expected, rtol=1e-5, atol=1e-6)


# (e) conversion of a tiny Llama -------------------------------------------------------------------


def test_quantized_llama_is_the_fp_model_with_nf4_weights():
    model = tiny_llama()
    ref_model = tiny_llama()  # same seed, same weights
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    names = q.quantize_model_nf4(model)
    assert len(names) == 2 * 7 and "lm_head" not in names
    max_half_gap = ((q.nf4_table()[1:] - q.nf4_table()[:-1]) / 2).max()
    for name in names:
        layer = model.get_submodule(name)
        deq = layer.dequantized_weight()
        err = (deq - originals[name]).reshape(-1, 64).abs()
        # Rounding to the nearest level: per-element error <= half the widest level gap times the scale.
        assert (err <= max_half_gap * layer.absmax.detach()[:, None] * (1 + 1e-6)).all()
        ref_model.get_submodule(name).weight.data.copy_(bnb_reference_weight(layer, layer.absmax))
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        out = model(x).logits
        torch.testing.assert_close(out, ref_model(x).logits, rtol=1e-5, atol=1e-6)
        fp = tiny_llama()(x).logits
    rel = (out - fp).norm() / fp.norm()
    assert 1e-3 < rel < 0.25


def test_tied_lm_head_is_left_shared():
    model = tiny_llama(tie=True)
    names = q.quantize_model_nf4(model, skip=())
    assert "lm_head" not in names
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_target_modules_and_memory_accounting():
    model = tiny_llama()
    fp_bytes = q.quantized_weight_bytes(model)
    names = q.quantize_model_nf4(model, target_modules=["q_proj", "v_proj"])
    assert [n.rsplit(".", 1)[1] for n in names] == ["q_proj", "v_proj"] * 2
    assert set(model.config.quantization_config["llm_int8_skip_modules"]) >= {
        "lm_head",
        "model.layers.0.mlp.up_proj",
    }
    acct = q.quantized_weight_bytes(model)
    n_quantized = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
    assert acct["codes"] == n_quantized // 2
    assert acct["scales"] == 4 * n_quantized // 64
    assert acct["other"] == fp_bytes["other"] - 4 * n_quantized
    assert acct["total"] == acct["codes"] + acct["scales"] + acct["other"]


# (f) conversion from bitsandbytes Linear4bit ------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_linear4bit_reproduces_the_layer(double_quant):
    torch.manual_seed(4)
    lin = nn.Linear(128, 64)
    layer = bnb.nn.Linear4bit(
        128, 64, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4"
    )
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes here
    assert layer.weight.quant_state.nested == double_quant
    x = torch.randn(3, 128)
    expected = layer(x).detach()
    expected_weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    converted = q.from_bnb_linear4bit(layer)
    assert torch.equal(converted.dequantized_weight(), expected_weight)
    assert torch.equal(converted(x).detach(), expected)
    assert [n for n, p in converted.named_parameters()] == ["absmax"]

    # After a no-grad eval forward, bitsandbytes' AVX512-BF16 CPU kernel (where present) has repacked the
    # codes and rounded the scales to bf16: the codes still come back exactly.
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x)
    again = q.from_bnb_linear4bit(layer)
    assert torch.equal(again.codes, converted.codes)
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        assert torch.equal(again.absmax, converted.absmax.detach().bfloat16().float())
        torch.testing.assert_close(again(x).detach(), eval_out, rtol=2e-2, atol=2e-2)
    else:
        assert torch.equal(again.absmax, converted.absmax)


def test_convert_bnb_loaded_double_quant_model(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "fp")
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bnb_config)
    x = torch.randint(0, 128, (2, 9))
    expected = model(x).logits.detach()  # grad-enabled forward: bitsandbytes' reference CPU path
    from transformers.trainer_utils import validate_quantization_for_training

    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)  # HF Trainer's refusal before conversion
    names = q.convert_bnb_model(model)
    assert len(names) == 14 and model.hf_quantizer is None
    validate_quantization_for_training(model)  # after: a plain model with trainable scales
    torch.testing.assert_close(model(x).logits.detach(), expected, rtol=1e-5, atol=1e-6)
    # Saved back with fp32 scales (no double quantization) and loadable.
    q.save_quantized(model, tmp_path / "q")
    assert (
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][
            "bnb_4bit_use_double_quant"
        ]
        is False
    )
    with torch.no_grad():
        torch.testing.assert_close(q.load_quantized(tmp_path / "q")(x).logits, expected, rtol=1e-5, atol=1e-6)


def test_load_state_dict_reads_bitsandbytes_keys_including_double_quant(tmp_path):
    # The path HF Trainer takes when it resumes: model.load_state_dict(<bnb-layout state dict>).
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config)
    x = torch.randint(0, 128, (2, 9))
    expected = bnb_model(x).logits.detach()
    sd = bnb_model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.nested_absmax" in sd

    target = tiny_llama(seed=1)  # different weights: everything must come from the state dict
    q.quantize_model_nf4(target)
    result = target.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(target(x).logits.detach(), expected, rtol=1e-5, atol=1e-6)
    # And a zoft state dict (fp32 scales) round-trips exactly.
    again = tiny_llama(seed=2)
    q.quantize_model_nf4(again)
    again.load_state_dict(target.state_dict(), strict=True)
    for a, b in zip(q.nf4_layers(again), q.nf4_layers(target)):
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.codes, b.codes)
