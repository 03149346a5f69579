"""WTA-CRS (zoft.memory.wta_crs) against the exact product, plain column-row sampling and plain-torch models."""

from __future__ import annotations

import copy
import math

import conftest
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from zoft.errors import ZoftError
from zoft.memory.wta_crs import (
    LLAMA_EAGER_TARGET_MODULES,
    LLAMA_TARGET_MODULES,
    GradNormCache,
    WTACRSLinear,
    apply_wta_crs,
    remove_wta_crs,
    sampling_probabilities,
    wta_crs_linear,
    wta_crs_sample,
)

torch.set_num_threads(1)


def skewed_problem(n=64, d=16, o=8, seed=0):
    """Inputs whose row norms span two orders of magnitude, as activations of LMs do (outlier tokens)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(n)
    scale[:4] = 30.0
    scale[4:12] = 5.0
    x = torch.randn(n, d, generator=g) * scale[:, None]
    grad_y = torch.randn(n, o, generator=g)
    return x, grad_y, grad_y.t() @ x


def sampled_weight_grads(x, grad_y, ratio, samples, **kw):
    w = torch.zeros(grad_y.shape[1], x.shape[1], requires_grad=True)
    out = []
    for _ in range(samples):
        y = wta_crs_linear(x, w, None, ratio, **kw)
        out.append(torch.autograd.grad(y, w, grad_y)[0])
    return torch.stack(out)


def saved_activation_bytes(fn, params):
    """Bytes of the distinct storages the autograd graph of ``fn()`` keeps, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


# ---------------------------------------------------------------- (a) unbiasedness


def test_weight_gradient_is_unbiased_error_shrinks_as_one_over_sqrt_samples():
    torch.manual_seed(0)
    x, grad_y, exact = skewed_problem()
    grads = sampled_weight_grads(x, grad_y, 0.25, 2000)
    # Per-sample total variance; for an unbiased estimator E||mean_S - exact||^2 = var / S.
    var = ((grads - exact) ** 2).sum(dim=(1, 2)).mean()
    errors = {}
    for s in (100, 400, 1600, 2000):
        err = (grads[:s].mean(0) - exact).norm() / exact.norm()
        bound = 3.5 * math.sqrt(var / s) / exact.norm()
        assert err <= bound, (s, float(err), float(bound))
        errors[s] = float(err)
    assert errors[2000] < 0.03
    assert errors[2000] < errors[100] / 2


def test_unbiasedness_check_catches_a_missing_reweighting():
    # Negative control: the reference code's first-visit branch keeps sampled rows without the 1/(s p_i)
    # factor; the same bound must reject that estimator.
    torch.manual_seed(0)
    x, grad_y, exact = skewed_problem()
    probs, k = sampling_probabilities(x), 16
    grads = []
    for _ in range(1600):
        idx, w = wta_crs_sample(probs, k)
        w = torch.where(w == 1.0, w, torch.ones_like(w))  # drop the reweighting of sampled rows
        grads.append((grad_y[idx] * w[:, None]).t() @ x[idx])
    grads = torch.stack(grads)
    var = ((grads - grads.mean(0)) ** 2).sum(dim=(1, 2)).mean()
    err = (grads.mean(0) - exact).norm() / exact.norm()
    assert err > 3.5 * math.sqrt(var / 1600) / exact.norm()


# ---------------------------------------------------------------- (b) variance below plain CRS


def test_variance_below_plain_column_row_sampling_at_same_budget():
    torch.manual_seed(0)
    x, grad_y, exact = skewed_problem()
    probs, k = sampling_probabilities(x), 16

    def variance(wta):
        est = []
        for _ in range(2000):
            idx, w = wta_crs_sample(probs, k, winner_take_all=wta)
            est.append((grad_y[idx] * w[:, None]).t() @ x[idx])
        return float(((torch.stack(est) - exact) ** 2).sum(dim=(1, 2)).mean())

    var_crs, var_wta = variance(False), variance(True)
    # Textbook CRS variance with p_i ∝ ||x_i||: (sum_i ||x_i||^2 ||g_i||^2 / p_i - ||G^T X||^2) / k.
    xn, gn = x.norm(dim=1), grad_y.norm(dim=1)
    analytic_crs = float(((xn**2 * gn**2 / probs).sum() - exact.norm() ** 2) / k)
    assert var_crs == pytest.approx(analytic_crs, rel=0.15)
    assert var_wta < 0.5 * var_crs


def test_deterministic_set_follows_the_variance_proxy():
    # Uniform probabilities: no row beats 1/k, so WTA-CRS is plain CRS (no deterministic rows, all weights != 1
    # unless a row happens to be drawn with weight exactly 1).
    n, k = 100, 10
    idx, w = wta_crs_sample(torch.full((n,), 1.0 / n), k, generator=torch.Generator().manual_seed(0))
    assert torch.all(w != 1.0)
    # One dominant row (p = 0.9 > 1/k): it is taken deterministically with weight 1.
    p = torch.full((n,), 0.1 / (n - 1))
    p[7] = 0.9
    idx, w = wta_crs_sample(p, k, generator=torch.Generator().manual_seed(0))
    assert 7 in idx.tolist() and float(w[idx.tolist().index(7)]) == 1.0
    assert len(idx) <= k and len(set(idx.tolist())) == len(idx)


# ---------------------------------------------------------------- (c) exact forward and input gradient


def test_forward_output_input_gradient_and_bias_gradient_are_exact():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    layer = WTACRSLinear(lin, 0.2).train()
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(4, 10, 16, requires_grad=True)
    grad_y = torch.randn(4, 10, 12)
    y = layer(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    gx, gw, gb = torch.autograd.grad(y, (x, lin.weight, lin.bias), grad_y)
    ref_x, ref_w, ref_b = torch.autograd.grad(
        F.linear(x, lin.weight, lin.bias), (x, lin.weight, lin.bias), grad_y
    )
    torch.testing.assert_close(gx, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, ref_b, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(gw, ref_w)  # the weight gradient is the sampled estimate


def test_eval_mode_runs_the_plain_linear_with_exact_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    layer = WTACRSLinear(lin, 0.1).eval()
    x = torch.randn(30, 16)
    grad_y = torch.randn(30, 12)
    gw = torch.autograd.grad(layer(x), lin.weight, grad_y)[0]
    torch.testing.assert_close(gw, grad_y.t() @ x)


# ---------------------------------------------------------------- (d) saved-tensor memory


def test_saved_activation_memory_scales_with_ratio():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    x = torch.randn(8, 64, 32)
    n, row_bytes = 8 * 64, 32 * 4
    plain, _ = saved_activation_bytes(lambda: lin(x), lin.parameters())
    assert plain == n * row_bytes
    previous = plain
    for ratio in (1.0, 0.5, 0.25, 0.1):
        layer = WTACRSLinear(lin, ratio).train()
        got, _ = saved_activation_bytes(lambda layer=layer: layer(x), lin.parameters())
        kept = math.ceil(ratio * n)
        if ratio == 1.0:
            assert got == plain
        else:
            # at most `kept` rows, each with an int64 index and a float32 weight
            assert got <= kept * (row_bytes + 12)
            assert got >= 0.5 * ratio * plain
            assert got < previous
        previous = got


def tiny_llama(attn="sdpa", seed=0):
    return conftest.tiny_llama(seed, attn_implementation=attn).train()


@pytest.mark.parametrize(
    "attn,targets,saves",
    [
        ("sdpa", ["q_proj"], False),  # k_proj / v_proj still keep the shared input
        ("sdpa", ["q_proj", "k_proj", "v_proj"], True),
        ("sdpa", ["gate_proj"], False),  # up_proj keeps it
        ("sdpa", ["gate_proj", "up_proj"], True),
        ("sdpa", ["down_proj"], True),
        ("sdpa", ["o_proj"], False),  # SDPA keeps its output, which is o_proj's input
        ("eager", ["o_proj"], True),
    ],
)
def test_llama_module_groups_worth_replacing(attn, targets, saves):
    model = tiny_llama(attn)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    n, d = ids.numel(), 64
    base, _ = saved_activation_bytes(lambda: model(input_ids=ids, labels=ids), model.parameters())
    apply_wta_crs(model, 0.25, targets)
    got, _ = saved_activation_bytes(lambda: model(input_ids=ids, labels=ids), model.parameters())
    saved_per_layer = (base - got) / 2 / (n * d * 4)  # in units of one hidden-size activation
    if saves:
        assert saved_per_layer > 0.5
    else:
        assert saved_per_layer <= 0.0


# ---------------------------------------------------------------- (e) HF Llama and peft LoRA


def test_apply_on_llama_full_fine_tuning():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    names = apply_wta_crs(model, 0.3, LLAMA_TARGET_MODULES)
    assert len(names) == 2 * 6 and "model.layers.1.mlp.down_proj" in names
    assert list(model.state_dict()) == keys
    out, ref_out = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, ref_out.logits)
    out.loss.backward()
    ref_out.loss.backward()
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not any(f"{t}.weight" in name for t in LLAMA_TARGET_MODULES):
            # Not replaced: input gradients are exact everywhere, so these gradients are exact too.
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6)
    before = params["model.layers.0.self_attn.q_proj.weight"].detach().clone()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(before, params["model.layers.0.self_attn.q_proj.weight"])


def test_llama_weight_gradient_is_unbiased_through_the_whole_model():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref(input_ids=ids, labels=ids).loss.backward()
    apply_wta_crs(model, 0.3, LLAMA_TARGET_MODULES)
    name = "model.layers.0.mlp.down_proj.weight"
    exact = dict(ref.named_parameters())[name].grad
    p = dict(model.named_parameters())[name]
    grads = []
    for _ in range(100):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(p.grad.clone())
    grads = torch.stack(grads)
    single = ((grads - exact).flatten(1).norm(dim=1) / exact.norm()).mean()
    averaged = (grads.mean(0) - exact).norm() / exact.norm()
    assert averaged < 0.3 * single  # 1/sqrt(100) = 0.1 for an unbiased estimate


def test_apply_on_peft_lora_wraps_lora_A_only():
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    model = tiny_llama()
    # init_lora_weights=False: a nonzero B, so the adapters change the output and receive real gradients.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_EAGER_TARGET_MODULES, init_lora_weights=False)
    pm = get_peft_model(model, cfg).train()
    ref = copy.deepcopy(pm)
    adapter_keys = list(get_peft_model_state_dict(pm))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    names = apply_wta_crs(pm, 0.3, LLAMA_TARGET_MODULES)
    assert len(names) == 12 and all(n.endswith(".lora_A.default") for n in names)
    layer = pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert type(layer.base_layer) is nn.Linear and isinstance(layer.lora_A["default"], WTACRSLinear)
    assert list(get_peft_model_state_dict(pm)) == adapter_keys
    out, ref_out = pm(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, ref_out.logits)
    out.loss.backward()
    ref_out.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        if "lora_B" in name:  # its input lora_A(x) is exact, and so is its output gradient
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6)


def test_remove_restores_plain_linears():
    model = tiny_llama()
    names = apply_wta_crs(model, 0.5, r".*\.mlp\.(gate|up|down)_proj")
    assert len(names) == 6
    assert sorted(remove_wta_crs(model)) == sorted(names)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)


# ---------------------------------------------------------------- forward-time gradient-norm estimate


def test_grad_norm_cache_records_norms_and_lowers_variance():
    torch.manual_seed(0)
    n, d, o = 64, 16, 8
    x = torch.randn(2, n // 2, d)  # even input norms ...
    grad_y = torch.randn(2, n // 2, o)
    grad_y[0, :3] *= 40.0  # ... but a few tokens with large output gradients
    exact = grad_y.reshape(n, o).t() @ x.reshape(n, d)
    lin = nn.Linear(d, o, bias=False)

    def variance(cache):
        layer = WTACRSLinear(lin, 0.25, grad_norm_cache=cache, name="layer").train()
        est = []
        for _ in range(300):
            if cache is not None:
                cache.set_batch([10, 11])
            est.append(torch.autograd.grad(layer(x), lin.weight, grad_y)[0])
        est = torch.stack(est)
        return float(((est - exact) ** 2).sum(dim=(1, 2)).mean()), est.mean(0)

    cache = GradNormCache()
    var_cached, mean_cached = variance(cache)
    torch.testing.assert_close(
        cache.lookup("layer", x.shape).float(), grad_y.norm(dim=-1).reshape(-1), rtol=1e-2, atol=0
    )
    var_plain, _ = variance(None)
    assert var_cached < 0.5 * var_plain
    assert (mean_cached - exact).norm() / exact.norm() < 4 * math.sqrt(var_cached / 300) / exact.norm()


# ---------------------------------------------------------------- (f) misuse


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.3", None])
def test_bad_ratio_is_one_line_error(ratio):
    with pytest.raises(ZoftError, match=r"ratio must be a number in \(0, 1\]"):
        apply_wta_crs(tiny_llama(), ratio, ["q_proj"])
    with pytest.raises(ZoftError, match="ratio"):
        WTACRSLinear(nn.Linear(4, 4), ratio)


def test_targets_matching_nothing_list_existing_names():
    with pytest.raises(ZoftError, match=r"match no linear layer.*down_proj.*q_proj") as e:
        apply_wta_crs(tiny_llama(), 0.3, ["query", "value"])
    assert "\n" not in str(e.value)
    with pytest.raises(ZoftError, match="match no linear layer"):
        apply_wta_crs(tiny_llama(), 0.3, r"layers\.9\..*")
    with pytest.raises(ZoftError, match="not a valid regex"):
        apply_wta_crs(tiny_llama(), 0.3, "q_proj(")
    with pytest.raises(ZoftError, match="non-empty list"):
        apply_wta_crs(tiny_llama(), 0.3, [])


def test_frozen_targets_and_double_application_are_refused():
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(ZoftError, match="none has a trainable weight"):
        apply_wta_crs(model, 0.3, ["q_proj"])
    model.requires_grad_(True)
    apply_wta_crs(model, 0.3, ["q_proj"])
    with pytest.raises(ZoftError, match="already uses WTA-CRS"):
        apply_wta_crs(model, 0.3, ["q_proj"])


def test_autocast_bf16_matches_plain_linear_forward_and_gives_fp32_weight_grads():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = WTACRSLinear(lin, 0.3).train()
    x = torch.randn(4, 20, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = F.linear(x, lin.weight, lin.bias)
    assert torch.equal(y, ref)
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------- gradient checkpointing (issue 22 item 1)


def _checkpointing_grads(lora, checkpointing, use_reentrant=False, rng_seed=0, steps=2):
    """Trainable gradients of `steps` forward/backward passes on a tiny Llama with WTA-CRS, summed per step."""
    model = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(model, cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    apply_wta_crs(model, 0.3, targets)
    torch.manual_seed(rng_seed)  # the forward seeds come from torch's default generator
    grads = []
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(10 + step))
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_draws_the_same_rows_as_without(lora, use_reentrant):
    # Regression (issue 22): the recomputed forward drew a new sample, so non-reentrant checkpointing raised
    # CheckpointError (different saved shapes) and reentrant checkpointing silently used other rows.
    plain = _checkpointing_grads(lora, checkpointing=False)
    checkpointed = _checkpointing_grads(lora, checkpointing=True, use_reentrant=use_reentrant)
    for step, (a, b) in enumerate(zip(plain, checkpointed)):
        assert sorted(a) == sorted(b)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")
    # ... and the gradients are sampled ones: another seed gives others.
    other = _checkpointing_grads(lora, checkpointing=True, use_reentrant=use_reentrant, rng_seed=1, steps=1)[0]
    sampled = [n for n in a if ("lora_A" in n if lora else "down_proj" in n)]
    assert sampled and all(not torch.allclose(other[n], plain[0][n]) for n in sampled)


def test_the_sample_is_a_function_of_the_forward_seed_and_the_layer_name():
    # An explicit seed: the rows depend on (seed, forward count, layer name), not on torch's global RNG.
    def grads(seed, rng):
        model = tiny_llama()
        apply_wta_crs(model, 0.3, ["down_proj"], seed=seed)
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(rng)
        out = []
        for _ in range(2):
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            out.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
        return out

    a, b, c = grads(5, rng=0), grads(5, rng=1), grads(6, rng=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the global RNG does not matter
    assert not torch.equal(a[0], a[1])  # a new forward, a new sample
    assert not torch.equal(a[0], c[0])  # another seed, another sample


# ---------------------------------------------------------------- gradient-aware sampling (issue 15 item 12)


def test_gradient_aware_probabilities_are_the_formula():
    torch.manual_seed(0)
    x = torch.randn(10, 6)
    g = torch.rand(10) * 3
    g[[2, 7]] = 0.0  # zero gradient (padding): floored at 1% of the mean, never 0
    p = sampling_probabilities(x, g)
    w = x.norm(dim=1) * torch.maximum(g, 0.01 * g.mean())
    torch.testing.assert_close(p, w / w.sum())
    torch.testing.assert_close(sampling_probabilities(x), x.norm(dim=1) / x.norm(dim=1).sum())


def test_gradient_aware_estimate_is_unbiased_and_beats_input_norms_with_padding():
    # Half the rows are "padding": ordinary inputs, zero output gradient. p ∝ ||x_i|| spends half the budget on
    # them; p ∝ ||x_i|| ||g_i|| (floored) spends almost none.
    torch.manual_seed(0)
    x, grad_y, _ = skewed_problem(n=64)
    grad_y[32:] = 0.0
    exact = grad_y.t() @ x
    k, samples = 16, 2000

    def estimates(hint):
        probs = sampling_probabilities(x, hint)
        out = []
        for _ in range(samples):
            idx, w = wta_crs_sample(probs, k)
            out.append((grad_y[idx] * w[:, None]).t() @ x[idx])
        return torch.stack(out)

    aware, plain = estimates(grad_y.norm(dim=1)), estimates(None)
    var_aware = ((aware - exact) ** 2).sum(dim=(1, 2)).mean()
    var_plain = ((plain - exact) ** 2).sum(dim=(1, 2)).mean()
    err = (aware.mean(0) - exact).norm() / exact.norm()
    assert err <= 3.5 * math.sqrt(var_aware / samples) / exact.norm()
    assert err < 0.02
    assert var_aware < 0.5 * var_plain


def _padded_batch(lengths, pad_to, seed=0, order=None):
    """Rows of random tokens (a fixed row per length), right-padded to `pad_to`, labels -100 on padding."""
    rows = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed + i)) for i, n in enumerate(lengths)]
    order = order or list(range(len(rows)))
    ids = torch.zeros(len(rows), pad_to, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(order):
        ids[r, : len(rows[i])], mask[r, : len(rows[i])] = rows[i], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_grad_norm_cache_keys_examples_by_tokens_and_stores_the_group_norms():
    model, ref = tiny_llama(), tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    cache = GradNormCache()
    apply_wta_crs(model, 0.3, targets, grad_norm_cache=cache)
    lengths = [12, 5, 9]
    batch = _padded_batch(lengths, pad_to=14)
    model(**batch).loss.backward()
    assert (cache.hits, cache.misses) == (0, 4)  # first visit: each layer's sampling group looks up, misses

    # Reference: per-token output-gradient norms of the plain model, q/k/v combined as sqrt(sum of squares).
    outs = {}

    def keep(name):
        def hook(module, args, y):
            y.retain_grad()
            outs[name] = y

        return hook

    for name, m in ref.named_modules():
        if name.endswith(tuple(targets)):
            m.register_forward_hook(keep(name))
    ref(**batch).loss.backward()
    for layer in range(2):
        attn = [outs[f"model.layers.{layer}.self_attn.{t}"].grad.norm(dim=-1) for t in ("q_proj", "k_proj", "v_proj")]
        groups = {
            f"model.layers.{layer}.self_attn.q_proj": torch.stack(attn).pow(2).sum(0).sqrt(),
            f"model.layers.{layer}.mlp.down_proj": outs[f"model.layers.{layer}.mlp.down_proj"].grad.norm(dim=-1),
        }
        for name, norms in groups.items():
            for row, n in enumerate(lengths):  # stored under the row's tokens, real positions only
                key = _row_key(batch, row)
                torch.testing.assert_close(cache._store[name][key].float(), norms[row, :n], rtol=1e-2, atol=1e-9)
    assert len(cache) == 4 * 3 and cache.nbytes() == 4 * sum(lengths) * 2  # bf16

    # Second visit: other order, other padding length: every group finds its rows, zeros at the padding.
    again = _padded_batch(lengths, pad_to=20, order=[2, 0, 1])
    model.zero_grad()
    model(**again).loss.backward()
    assert (cache.hits, cache.misses) == (4, 4)
    cache.set_batch_from_tokens(again["input_ids"], again["attention_mask"])
    hint = cache.lookup("model.layers.0.mlp.down_proj", torch.Size([3, 20, 64]))
    assert hint is not None and torch.all(hint.view(3, 20)[again["attention_mask"] == 0] == 0)


def _row_key(batch, row):
    probe = GradNormCache()
    probe.set_batch_from_tokens(batch["input_ids"][row : row + 1], batch["attention_mask"][row : row + 1])
    return probe.batch_ids[0]


def test_a_model_called_twice_with_one_input_tensor_samples_it_twice():
    # The layers of one apply_wta_crs call share a sample of a shared input within a forward, never across two.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).train()
    apply_wta_crs(model, 0.25, ["0"])
    x, grad_y = torch.randn(64, 16), torch.randn(64, 16)
    grads = []
    for _ in range(2):
        model.zero_grad()
        model(x).backward(grad_y)
        grads.append(model[0].weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])
