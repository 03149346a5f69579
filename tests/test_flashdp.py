"""FlashDP per-layer clipping, DP-SGD noise, accounting and DPZero against torch.func, Opacus and formulas."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from zoft.errors import ZoftError
from zoft.kernels.flashdp_reference import linear_grad_explicit, linear_grad_ghost
from zoft.privacy import (
    DPOptimizer,
    PoissonBatchSampler,
    add_noise,
    attach_flashdp,
    dpzero_projected_grad,
    epsilon_spent,
    noise_for_target_epsilon,
    split_total_bound,
)

torch.set_num_threads(2)


class TinyNet(nn.Module):
    """Embedding -> LayerNorm -> Linear -> tanh -> RMSNorm -> Linear, mean over tokens."""

    def __init__(self, vocab=13, dim=8, hidden=16, out=3, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.rms = nn.RMSNorm(hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, ids):
        return self.fc2(self.rms(torch.tanh(self.fc1(self.ln(self.emb(ids)))))).mean(1)


class LinearStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2))

    def forward(self, x):
        return self.net(x).sum(1) if x.dim() == 3 else self.net(x)


def _per_sample_grads(model, loss_of_one, *batch):
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    return vmap(grad(lambda p, *xs: loss_of_one(model, p, *xs)), in_dims=(None,) + (0,) * len(batch))(
        params, *batch
    )


def _clip_and_sum(per_sample, bounds):
    out = {}
    for k, g in per_sample.items():
        norms = g.flatten(1).norm(dim=1)
        factors = (bounds[k] / (norms + 1e-6)).clamp(max=1.0)
        out[k] = torch.tensordot(factors, g, dims=1)
    return out


def _median_bounds(per_sample):
    # Between the smallest and largest per-sample norm, so some samples are clipped and some are not.
    return {k: g.flatten(1).norm(dim=1).median().item() for k, g in per_sample.items()}


def _mse_one(model, p, x, y):
    return ((functional_call(model, p, (x[None],)) - y[None]) ** 2).sum()


@pytest.mark.parametrize("path", ["auto", "explicit", "ghost"])
@pytest.mark.parametrize("tokens", [None, 5])
def test_linear_stack_matches_torch_func(path, tokens):
    torch.manual_seed(0)
    model = LinearStack()
    shape = (7, 6) if tokens is None else (7, tokens, 6)
    x, y = torch.randn(shape), torch.randn(7, 2)
    per_sample = _per_sample_grads(model, _mse_one, x, y)
    bounds = _median_bounds(per_sample)
    expected = _clip_and_sum(per_sample, bounds)

    handle = attach_flashdp(model, bounds, path=path)
    ((model(x) - y) ** 2).sum(1).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(handle.norms[name], per_sample[name].flatten(1).norm(dim=1))
    assert handle.paths["net.0.weight"] == ("explicit" if path == "explicit" else "ghost")
    assert handle.paths["net.0.bias"] == "elementwise"


def test_embedding_and_norm_layers_match_torch_func():
    torch.manual_seed(1)
    model = TinyNet()
    ids = torch.randint(0, 13, (6, 5))
    ids[0, :2] = 0  # padding rows get no gradient
    ids[1, :] = 4  # one token repeated: its rows add up before the norm
    y = torch.randn(6, 3)
    per_sample = _per_sample_grads(model, _mse_one, ids, y)
    bounds = _median_bounds(per_sample)
    expected = _clip_and_sum(per_sample, bounds)

    handle = attach_flashdp(model, bounds)
    ((model(ids) - y) ** 2).sum(1).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6)
    assert handle.paths["emb.weight"] == "rows"
    assert handle.paths["rms.weight"] == "elementwise"


def _tiny_llama_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make A's gradient non-zero too
            nn.init.normal_(p, std=0.1)
    return model


def _lm_loss_one(model, p, ids):
    return functional_call(model, (p,), args=(), kwargs={"input_ids": ids[None], "labels": ids[None]}, strict=False).loss


def test_llama_lora_matches_torch_func():
    model = _tiny_llama_lora()
    ids = torch.randint(0, 64, (4, 8))
    per_sample = _per_sample_grads(model, _lm_loss_one, ids)
    bounds = _median_bounds(per_sample)
    expected = _clip_and_sum(per_sample, bounds)

    handle = attach_flashdp(model, bounds)
    model(input_ids=ids, labels=ids).loss.backward()  # mean over tokens = mean of per-sample means
    assert set(handle.bounds) == set(expected) and len(expected) == 8
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
    # 8 tokens: T^2 = 64 < d_in * d_out = 32 * 4 = 128, the ghost norm is cheaper; v_proj's lora_B is
    # 4 -> 16 (2 KV heads of 8), 64 < 64 fails, so it forms per-sample gradients explicitly.
    layer0 = "base_model.model.model.layers.0.self_attn."
    assert handle.paths[layer0 + "q_proj.lora_A.default.weight"] == "ghost"
    assert handle.paths[layer0 + "q_proj.lora_B.default.weight"] == "ghost"
    assert handle.paths[layer0 + "v_proj.lora_B.default.weight"] == "explicit"


def _opacus_per_layer_grads(model, bounds, run_loss, batch_size):
    from opacus import GradSampleModule
    from opacus.optimizers import DPPerLayerOptimizer

    gsm = GradSampleModule(model, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    opt = DPPerLayerOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=[bounds[names[id(p)]] for p in params],
        expected_batch_size=batch_size,
        loss_reduction="mean",
    )
    run_loss(gsm).backward()
    opt.pre_step()
    return {names[id(p)]: p.grad.clone() for p in params}


@pytest.mark.parametrize("which", ["tinynet", "llama_lora"])
def test_matches_opacus_per_layer_clipping(which):
    torch.manual_seed(2)
    if which == "tinynet":
        # Opacus's embedding grad sampler ignores padding_idx (it gives the padding row a per-sample
        # gradient that nn.Embedding does not), so compare on an embedding without one.
        model = TinyNet(padding_idx=None)
        ids, y = torch.randint(0, 13, (6, 5)), torch.randn(6, 3)

        def run_loss(m):
            return ((m(ids) - y) ** 2).sum(1).mean()
    else:
        model = _tiny_llama_lora()
        ids = torch.randint(0, 64, (5, 8))

        def run_loss(m):
            return m(input_ids=ids, labels=ids).loss

    batch = ids.shape[0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    bounds = {n: 0.05 * (i + 1) for i, n in enumerate(names)}
    reference = _opacus_per_layer_grads(copy.deepcopy(model), bounds, run_loss, batch)

    handle = attach_flashdp(model, bounds)
    run_loss(model).backward()
    add_noise(handle.parameters(), 0.0, handle, expected_batch_size=batch)
    for name in names:
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, reference[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 1, 40, 7), (4, 9, 5, 6), (2, 30, 3, 3)])
def test_ghost_path_equals_explicit(shape):
    batch, tokens, d_in, d_out = shape
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(batch, tokens, d_in, generator=gen), torch.randn(batch, tokens, d_out, generator=gen)
    for bound in (0.5, 1e6):
        ref, ref_norms = linear_grad_explicit(x, g, bound, scale=2.5, block_bytes=1)
        got, norms = linear_grad_ghost(x, g, bound, scale=2.5, block_bytes=1)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    unclipped = 2.5 * torch.einsum("bto,bti->oi", g, x)
    torch.testing.assert_close(ref, unclipped, rtol=1e-5, atol=1e-4)  # bound 1e6 clips nothing


def test_gradient_accumulation_equals_one_batch_and_noise_once():
    torch.manual_seed(4)
    model = LinearStack()
    x, y = torch.randn(6, 4, 6), torch.randn(6, 2)
    handle = attach_flashdp(model, total_bound=1.0)
    ((model(x) - y) ** 2).sum(1).mean().backward()
    one_batch = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    for sl in (slice(0, 2), slice(2, 6)):  # micro-batches of 2 and 4, loss = micro-batch mean
        ((model(x[sl]) - y[sl]) ** 2).sum(1).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, one_batch[n], rtol=1e-5, atol=1e-6)

    sigma, expected_batch = 3.0, 6.0
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), handle, sigma, expected_batch,
                      torch.Generator().manual_seed(0))  # fmt: skip
    opt.step()
    noise = torch.cat([(p.grad - one_batch[n] / expected_batch).flatten() for n, p in model.named_parameters()])
    std = sigma * handle.total_bound / expected_batch
    # One draw per step (not one per micro-batch, which would give sqrt(2) std): n = 362 draws,
    # the sample std's standard error is std / sqrt(2n) ~ 3.7% of std; allow 5 of them.
    assert abs(noise.std().item() / std - 1) < 5 / math.sqrt(2 * noise.numel())
    assert opt.steps == 1


def test_noise_std_matches_formula():
    bounds = {"a": 0.3, "b": 1.2, "c": 0.4}
    total = math.sqrt(0.09 + 1.44 + 0.16)
    params = [torch.zeros(200, 100, requires_grad=True), torch.zeros(10, requires_grad=True)]
    sigma, batch = 0.7, 16.0
    std = add_noise(params, sigma, bounds, torch.Generator().manual_seed(0), expected_batch_size=batch)
    assert std == pytest.approx(sigma * total)
    draws = torch.cat([p.grad.flatten() for p in params]) * batch
    n = draws.numel()
    # Sample std of n Gaussians has standard error std/sqrt(2n); the mean has std/sqrt(n). 5 sigma each.
    assert abs(draws.std().item() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(draws.mean().item()) < 5 * std / math.sqrt(n)
    assert add_noise(params, sigma, total) == pytest.approx(sigma * total)  # a float total works too


def test_total_bound_split_and_missing_bounds():
    split = split_total_bound(["a", "b", "c", "d"], 2.0)
    assert all(v == pytest.approx(1.0) for v in split.values())
    assert math.sqrt(sum(v * v for v in split.values())) == pytest.approx(2.0)
    with pytest.raises(ZoftError, match="missing: net.4.bias"):
        attach_flashdp(LinearStack(), {n: 1.0 for n, _ in LinearStack().named_parameters() if n != "net.4.bias"})
    with pytest.raises(ZoftError, match="exactly one of"):
        attach_flashdp(LinearStack())


def test_epsilon_matches_opacus_accountant_and_round_trips():
    from opacus.accountants import RDPAccountant

    q, sigma, steps, delta = 0.01, 1.1, 300, 1e-5
    acc = RDPAccountant()
    for _ in range(steps):  # the step-by-step path of Opacus, not the history shortcut used by zoft
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_spent(q, sigma, steps, delta) == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)

    # Without subsampling the Gaussian mechanism's RDP is steps * alpha / (2 sigma^2) (Mironov 2017);
    # Opacus converts with eps = rdp + log((a-1)/a) - (log delta + log a) / (a-1), min over its orders.
    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    closed = min(
        10 * a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in alphas
    )
    assert epsilon_spent(1.0, sigma, 10, delta) == pytest.approx(closed, rel=1e-9)

    target = 3.0
    found = noise_for_target_epsilon(target, delta, q, steps)
    assert target - 0.01 <= epsilon_spent(q, found, steps, delta) <= target
    assert epsilon_spent(q, found * 0.97, steps, delta) > target - 0.01  # and not much more noise than needed
    prv = epsilon_spent(q, sigma, steps, delta, accountant="prv")
    assert 0 < prv <= epsilon_spent(q, sigma, steps, delta) * 1.05  # PRV is at least as tight as RDP
    with pytest.raises(ZoftError, match="delta must be in"):
        epsilon_spent(q, sigma, steps, 0.0)


def test_dpzero_clipping_and_noise():
    loss_minus = torch.zeros(4)
    loss_plus = torch.tensor([0.001, -0.5, 10.0, 0.002])
    eps, clip = 1e-3, 2.0
    # per-sample scalars 0.5, -250, 5000, 1.0 -> clipped 0.5, -2, 2, 1.0; mean 0.375
    got = dpzero_projected_grad(loss_plus, loss_minus, eps, clip, sigma=0.0)
    assert got.item() == pytest.approx(0.375)
    # Sensitivity: changing one sample's losses arbitrarily moves the sum by at most 2C.
    worse = dpzero_projected_grad(torch.tensor([0.001, 1e9, -1e9, 0.002]), loss_minus, eps, clip, sigma=0.0)
    assert abs(worse.item() * 4 - got.item() * 4) <= 2 * clip + 1e-6

    sigma, n = 1.5, 4000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([dpzero_projected_grad(loss_plus, loss_minus, eps, clip, sigma, gen) for _ in range(n)])
    std = sigma * clip / 4
    assert abs((draws - 0.375).std().item() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(draws.mean().item() - 0.375) < 5 * std / math.sqrt(n)
    scaled = dpzero_projected_grad(loss_plus, loss_minus, eps, clip, 0.0, expected_batch_size=8)
    assert scaled.item() == pytest.approx(0.1875)
    with pytest.raises(ZoftError, match="shape \\[B\\]"):
        dpzero_projected_grad(torch.zeros(2, 3), torch.zeros(2, 3), eps, clip, sigma)


def test_batchnorm_and_unsupported_modules_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ZoftError, match=r"1 \(BatchNorm1d\) mixes the samples"):
        attach_flashdp(model, total_bound=1.0)
    model[1].requires_grad_(False)  # frozen or not, batch norm mixes samples in training mode
    with pytest.raises(ZoftError, match="BatchNorm1d"):
        attach_flashdp(model, total_bound=1.0)

    mha = nn.Sequential(nn.Linear(4, 4))
    mha.add_module("attn", nn.MultiheadAttention(4, 2))
    with pytest.raises(ZoftError, match=r"no per-sample clipping for trainable parameters of attn \(MultiheadAttention\)"):
        attach_flashdp(mha, total_bound=1.0)


def test_tied_and_reused_weights_are_refused():
    tied = TinyNet(vocab=8, dim=8, hidden=8, out=8)
    tied.fc2.weight = tied.emb.weight
    with pytest.raises(ZoftError, match=r"shared by several modules: emb.weight \(in emb and fc2\)"):
        attach_flashdp(tied, total_bound=1.0)

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    model = Reuse()
    attach_flashdp(model, total_bound=1.0)
    with pytest.raises(ZoftError, match="module fc ran 2 times"):
        model(torch.randn(2, 3)).sum().backward()

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return x @ self.fc.weight  # bypasses the module's forward, so it would not be clipped

    model = Direct()
    attach_flashdp(model, total_bound=1.0)
    with pytest.raises(ZoftError, match="fc.weight got a gradient outside its module fc"):
        model(torch.randn(2, 3)).sum().backward()


def test_detach_restores_the_model_and_state_dict_is_untouched():
    torch.manual_seed(5)
    model = TinyNet()
    ids = torch.randint(0, 13, (3, 4))
    before = model(ids).detach()
    keys = list(model.state_dict())
    handle = attach_flashdp(model, total_bound=1.0)
    torch.testing.assert_close(model(ids), before)  # same forward values while attached
    assert list(model.state_dict()) == keys
    handle.detach()
    assert all("forward" not in m.__dict__ for m in model.modules())
    model(ids).sum().backward()  # plain backward again: the unclipped sum
    per_sample = _per_sample_grads(model, lambda m, p, i: functional_call(m, p, (i[None],)).sum(), ids)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, per_sample[name].sum(0), rtol=1e-5, atol=1e-6)


def test_poisson_sampler_rate():
    sampler = PoissonBatchSampler(500, 0.05, steps=200, generator=torch.Generator().manual_seed(0))
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 200 and sampler.expected_batch_size == pytest.approx(25.0)
    # Batch sizes are Binomial(500, 0.05): mean 25, std 4.87; the mean of 200 has std 0.34.
    assert abs(sum(sizes) / 200 - 25.0) < 5 * 0.34
    assert max(sizes) - min(sizes) > 5  # sizes vary, unlike fixed batches


# ---------------------------------------------------------------- models that flatten the batch (issue 15)


def _tiny_flattening_lora(arch):
    """A tiny HF model whose layers see the batch's tokens flattened to [B*T, d], with adapters on those layers.

    OPT reshapes [B, T, d] to [B*T, d] before its MLP (fc1, fc2) and each layer's final_layer_norm; Qwen2-MoE
    does so before the sparse block, whose shared expert (gate/up/down_proj) and shared_expert_gate are
    ordinary linears. q/v_proj keep [B, T, d].
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if arch == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        model = OPTForCausalLM(OPTConfig(
            vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        ))  # fmt: skip
        targets = ["q_proj", "v_proj", "fc1", "fc2"]
    else:
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        ))  # fmt: skip
        targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make A's gradient non-zero too
            nn.init.normal_(p, std=0.5)
        if arch == "opt" and "layers.0.final_layer_norm" in name:
            p.requires_grad_(True)  # a LayerNorm (weight and bias) on the flattened rows
    return model


def _per_example_grads_one_by_one(model, ids):
    """Each example's gradient from its own forward (torch.func.grad of its loss alone), stacked [B, ...]."""
    from torch.func import grad as func_grad

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p, one):
        return functional_call(model, (p,), args=(), kwargs={"input_ids": one, "labels": one}, strict=False).loss

    rows = [func_grad(loss)(params, ids[i : i + 1]) for i in range(ids.shape[0])]
    return {k: torch.stack([r[k] for r in rows]) for k in params}


@pytest.mark.parametrize("arch", ["opt", "qwen2_moe"])
def test_flattened_rows_are_regrouped_into_examples(arch):
    # Regression (issue 15): FlashDP took every module input's dim 0 as the example, so a [B*T, d] input
    # clipped each token separately: B*T "samples" for fc1's LoRA, B for q_proj.
    model = _tiny_flattening_lora(arch).eval()  # eval: no dropout, gradients still flow
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    per_example = _per_example_grads_one_by_one(model, ids)
    bounds = _median_bounds(per_example)
    expected = _clip_and_sum(per_example, bounds)

    handle = attach_flashdp(model, bounds)
    model(input_ids=ids, labels=ids).loss.backward()  # equal lengths: the token mean is the mean of the examples'
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(handle.norms[name], per_example[name].flatten(1).norm(dim=1), rtol=1e-4,
                                       atol=1e-6)
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
    flattened = {n.split(".lora_")[0].split(".")[-1] for n, rows in handle.rows.items() if rows == "token"}
    # the layers that see [B*T, d]: their LoRA A/B (and OPT's final_layer_norm); q/v_proj keep [B, T, d]
    assert flattened == ({"fc1", "fc2", "final_layer_norm"} if arch == "opt" else
                         {"gate_proj", "up_proj", "down_proj", "shared_expert_gate"})


@pytest.mark.parametrize("arch", ["opt", "qwen2_moe"])
def test_one_examples_clipped_gradient_stays_within_the_total_bound(arch):
    model = _tiny_flattening_lora(arch).eval()
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(2))  # ONE 24-token example
    total = 1e-3  # below almost every layer's gradient: nearly all are clipped to their C_l
    handle = attach_flashdp(model, total_bound=total, loss_reduction="sum")
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(v.numel() == 1 for v in handle.norms.values())  # one example, one norm per tensor
    norm = torch.cat([p.grad.flatten() for p in handle.parameters()]).norm().item()
    assert norm <= total * (1 + 1e-4)
    assert norm > 0.9 * total  # the bound is what limits it


def test_rows_that_are_neither_examples_nor_their_tokens_are_refused():
    class Gather(nn.Module):
        """Like a MoE expert: a linear over a data-dependent subset of the batch's tokens."""

        def __init__(self):
            super().__init__()
            self.expert = nn.Linear(4, 4)

        def forward(self, x):
            flat = x.reshape(-1, 4)
            return self.expert(flat[flat[:, 0] > 0]).sum()

    model = Gather()
    attach_flashdp(model, total_bound=1.0)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ZoftError) as info:
        model(x)
    rows = int((x.reshape(-1, 4)[:, 0] > 0).sum())
    assert str(info.value) == (
        f"FlashDP: module expert got an input with {rows} rows for a batch of 2 examples of 5 tokens, so its rows "
        "are neither the examples nor all their tokens (e.g. a MoE expert sees a subset of the tokens) and "
        "per-example clipping cannot group them; freeze its parameters (requires_grad_(False)) or leave it out "
        "of the adapters"
    )


def test_packed_rows_are_refused():
    model = _tiny_llama_lora()
    attach_flashdp(model, total_bound=1.0)
    ids = torch.randint(0, 64, (1, 8))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # two sequences in one row (padding-free batching)
    with pytest.raises(ZoftError, match=r"packs several sequences into one row .*SFTConfig\(packing=False, "):
        model(input_ids=ids, labels=ids, position_ids=packed)
    model(input_ids=ids, labels=ids, position_ids=torch.arange(8)[None]).loss.backward()  # one sequence: fine
    with torch.no_grad():
        model(input_ids=ids, position_ids=packed)  # evaluation does not clip: packing is the user's business


# ---------------------------------------------------------------- adjacency: Poisson add/remove vs fixed-batch replace-one


def _sample_std_band(std, n):
    # The sample std of n Gaussian draws has standard error std / sqrt(2n): allow 5 of them.
    return 5 * std / math.sqrt(2 * n)


def test_replace_one_adjacency_doubles_the_noise_of_add_noise_and_dpzero():
    params = [torch.zeros(300, 100, requires_grad=True)]
    sigma, total, batch = 0.7, 1.3, 8.0
    std = add_noise(params, sigma, total, torch.Generator().manual_seed(0), batch, adjacency="replace_one")
    assert std == pytest.approx(2 * sigma * total)  # one example moves the clipped sum by up to 2C
    draws = params[0].grad.flatten() * batch
    assert abs(draws.std().item() - std) < _sample_std_band(std, draws.numel())

    loss_plus, loss_minus, eps, clip, n = torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.zeros(4), 1.0, 0.5, 4000
    gen = torch.Generator().manual_seed(1)
    for adjacency, k in (("add_remove", 1), ("replace_one", 2)):
        signal = dpzero_projected_grad(loss_plus, loss_minus, eps, clip, 0.0).item()
        draws = torch.stack([
            dpzero_projected_grad(loss_plus, loss_minus, eps, clip, 1.5, gen, adjacency=adjacency) for _ in range(n)
        ])  # fmt: skip
        want = k * 1.5 * clip / 4
        assert abs((draws - signal).std().item() - want) < _sample_std_band(want, n), adjacency
    with pytest.raises(ZoftError, match="adjacency must be one of add_remove, replace_one, got 'swap'"):
        add_noise(params, sigma, total, adjacency="swap")


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_private_step_noise_std_follows_the_sampling_adjacency(sampling):
    # Regression (issue 15): with fixed-size (shuffled) batches neighbours replace one example, so the clipped
    # sum moves by up to 2C; zoft added sigma C (the Poisson add/remove std) there, half the noise needed.
    from zoft.privacy.trainer_dp import PrivacyConfig, PrivacyEngine

    sigma, clip, batch, n_data = 1.2, 0.8, 4, 40
    engine = PrivacyEngine(PrivacyConfig(method="flashdp", noise_multiplier=sigma, clip_bound=clip, sampling=sampling,
                                         seed=0), num_samples=n_data, micro_batch_size=batch, accumulation=1)
    model = nn.Linear(200, 100, bias=False)
    engine.calibrate(10)
    engine.attach(model)
    engine.count_examples(batch)  # one full micro-batch; no backward: the step is pure noise
    engine.noise_step()
    draws = model.weight.grad.flatten() * batch  # expected batch size q N = batch as well
    k = 2 if sampling == "shuffle" else 1
    assert abs(draws.std().item() - k * sigma * clip) < _sample_std_band(k * sigma * clip, draws.numel())
    assert engine.report(1)["adjacency"] == ("replace_one" if sampling == "shuffle" else "add_remove")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_clipped_gradients(reentrant):
    # Checkpointing reruns each layer's forward inside the backward (under no_grad first when reentrant): the
    # recomputed layers must still group rows by the batch's examples and be clipped once.
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        model = _tiny_llama_lora()
        if checkpointing:
            model.enable_input_require_grads()  # what HF / TRL do for peft models with checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        handle = attach_flashdp(model, total_bound=0.05, loss_reduction="sum")
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(v.numel() == 3 for v in handle.norms.values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8)
