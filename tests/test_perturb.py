"""The seeded perturbation and the SPSA estimate, against the math they claim."""

import pytest
import torch
from torch import nn

from zoft.zo.estimate import spsa
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.perturb import ZOParameters, derive_seed, sample_z


class Quadratic(nn.Module):
    """f(theta) = 1/2 theta^T A theta + b^T theta, as a module whose forward owns theta."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T + torch.eye(d, dtype=torch.float64))
        self.register_buffer("b", torch.randn(d, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def grad(self):
        return self.A @ self.theta.detach() + self.b


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 7)
        self.second = nn.Linear(7, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.second(torch.relu(self.first(x))))


def test_seed_is_a_pure_function_of_run_step_direction_name():
    assert derive_seed(1, 2, 0, "a.weight") == derive_seed(1, 2, 0, "a.weight")
    seeds = {derive_seed(1, 2, 0, "a.weight"), derive_seed(1, 3, 0, "a.weight"), derive_seed(1, 2, 1, "a.weight"),
             derive_seed(2, 2, 0, "a.weight"), derive_seed(1, 2, 0, "b.weight")}
    assert len(seeds) == 5
    assert all(0 <= s < 2**63 for s in seeds)


def test_z_is_identical_whatever_order_parameters_are_visited_in():
    zo = ZOParameters(TwoLayer(), run_seed=3)
    names = list(zo.params)
    forward = {n: zo.z(n, step=5, direction=1) for n in names}
    backward = {n: zo.z(n, step=5, direction=1) for n in reversed(names)}
    for n in names:
        assert torch.equal(forward[n], backward[n])
    # ...and each is the same as sampling that parameter alone from its seed.
    w = zo.params["first.weight"]
    alone = sample_z(w.shape, derive_seed(3, 5, 1, "first.weight"))
    assert torch.equal(forward["first.weight"], alone)


def test_perturbed_forward_sees_theta_plus_scale_z_in_every_module_and_restores_exactly():
    model = TwoLayer()
    zo = ZOParameters(model, run_seed=11)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    def capture(module, args, name):
        seen[name] = module.weight.detach().clone()

    x = torch.randn(4, 5)
    with zo.perturbed(step=2, direction=0, scale=0.5):
        # prepend: run inside the module's forward window, before zo swaps the stored value back.
        h1 = model.first.register_forward_hook(lambda m, a, o: capture(m, a, "first.weight"), prepend=True)
        h2 = model.second.register_forward_hook(lambda m, a, o: capture(m, a, "second.weight"), prepend=True)
        out = model(x)
        h1.remove(), h2.remove()
    for name in ("first.weight", "second.weight"):
        expected = before[name] + 0.5 * zo.z(name, 2, 0)
        assert torch.equal(seen[name], expected)
    # The output is the function at theta + 0.5 z, computed independently:
    ref = TwoLayer()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(before[n] + 0.5 * zo.z(n, 2, 0))
    assert torch.allclose(out, ref(x), atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_restore_is_exact_even_when_the_forward_raises():
    model = TwoLayer()
    zo = ZOParameters(model, run_seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError):
        with zo.perturbed(0, 0, 1.0):
            model(torch.randn(2, 5))
            model(torch.randn(2, 4))  # shape error inside the perturbed forward
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_spsa_projected_gradient_is_the_directional_derivative_and_averages_to_the_gradient():
    model = Quadratic()
    zo = ZOParameters(model, run_seed=1, master_weights="none")
    eps = 1e-3
    total = torch.zeros_like(model.theta)
    n = 3000
    for step in range(n):
        (est,) = spsa(zo, model, step=step, eps=eps)
        z = zo.z("theta", step, 0).to(torch.float64)
        # For a quadratic the central difference is exact: g = z^T grad f.
        assert est.projected_grad == pytest.approx(float(z @ model.grad()), rel=1e-6, abs=1e-6)
        total += est.projected_grad * z
    mean = total / n
    true = model.grad()
    # E[(z^T g) z] = g for z ~ N(0, I); the Monte-Carlo error shrinks like sqrt(d / n).
    assert torch.linalg.norm(mean - true) / torch.linalg.norm(true) < 0.12


def test_rademacher_directions_are_plus_minus_one_and_unbiased():
    z = sample_z((10000,), seed=5, distribution="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.05


@pytest.mark.parametrize("z_generator", ["torch", "philox"])
def test_step_with_zero_learning_rate_leaves_every_parameter_exactly_as_it_was(z_generator):
    for dtype in (torch.float32, torch.bfloat16):
        model = TwoLayer().to(dtype)
        zo = ZOParameters(model, run_seed=0, z_generator=z_generator)
        opt = MeZOOptimizer(zo, lr=0.0, weight_decay=0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        x = torch.randn(3, 5, dtype=dtype)
        for step in range(3):
            for est in spsa(zo, lambda m=model, x=x: m(x).float().pow(2).mean(), step=step, eps=1e-2, n_directions=2):
                opt.record(step, est)
            passes = zo.weight_passes
            opt.step()
            if z_generator == "philox":  # lr = 0: the philox update does not touch the weights at all
                assert zo.weight_passes == passes
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), (dtype, n)


def test_update_is_theta_minus_lr_times_g_z_plus_decay_with_no_decay_for_bias_and_norm():
    model = TwoLayer()
    zo = ZOParameters(model, run_seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd, g = 0.1, 0.01, 2.5
    zo.apply_update(step=7, coefficients=[(0, g)], lr=lr, weight_decay=wd)
    for n, p in model.named_parameters():
        z = zo.z(n, 7, 0)
        decay = 0.0 if (n.endswith("bias") or n.startswith("norm")) else wd
        expected = before[n] * (1 - lr * decay) - lr * g * z
        assert torch.allclose(p, expected, atol=1e-7), n


def test_bf16_parameters_keep_an_fp32_master_so_tiny_updates_accumulate():
    model = TwoLayer().to(torch.bfloat16)
    zo = ZOParameters(model, run_seed=0)  # master_weights="auto"
    assert set(zo.masters) == {n for n, _ in model.named_parameters()}
    start = {n: zo.masters[n].clone() for n in zo.masters}
    for step in range(20):
        zo.apply_update(step, [(0, 1.0)], lr=1e-6)
    for n, p in model.named_parameters():
        expected = start[n] - 1e-6 * sum(zo.z(n, s, 0) for s in range(20))
        assert torch.allclose(zo.masters[n], expected, atol=1e-7)
        assert torch.equal(p, zo.masters[n].to(torch.bfloat16))
    # Without a master the same updates vanish below bf16 resolution:
    plain = TwoLayer().to(torch.bfloat16)
    ref = {n: p.detach().clone() for n, p in plain.named_parameters()}
    zo_plain = ZOParameters(plain, run_seed=0, master_weights="none")
    for step in range(20):
        zo_plain.apply_update(step, [(0, 1.0)], lr=1e-6)
    changed = sum((p != ref[n]).sum().item() for n, p in plain.named_parameters())
    total = sum(p.numel() for p in plain.parameters())
    assert changed / total < 0.05  # almost every update was lost to bf16 rounding
    master_changed = sum((zo.masters[n] != start[n]).sum().item() for n in zo.masters)
    assert master_changed / total > 0.95


def test_tied_weights_are_one_parameter_with_one_z_seen_by_both_users():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    zo = ZOParameters(model, run_seed=0)
    assert "lm_head.weight" not in zo.params and "model.embed_tokens.weight" in zo.params
    seen = {}
    ids = torch.tensor([[1, 2, 3]])
    with zo.perturbed(0, 0, 0.1):
        h1 = model.model.embed_tokens.register_forward_hook(
            lambda m, a, o: seen.__setitem__("emb", m.weight.clone()), prepend=True
        )
        h2 = model.lm_head.register_forward_hook(
            lambda m, a, o: seen.__setitem__("head", m.weight.clone()), prepend=True
        )
        model(ids)
        h1.remove(), h2.remove()
    assert torch.equal(seen["emb"], seen["head"])
    assert not torch.equal(seen["emb"], model.lm_head.weight)
    gens = zo.z_generations
    with zo.perturbed(0, 0, 0.1):
        model(ids)
    assert zo.z_generations - gens == len(zo.params)  # each parameter's z sampled once per forward
