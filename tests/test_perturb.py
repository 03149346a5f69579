"""The seeded perturbation and the SPSA estimate, against the math they claim."""

import pytest
import torch
from torch import nn

from zoft.zo.estimate import spsa
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.lowprec import RoundingBits, rounding_seed, stochastic_round
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


def _expected_rounded_update(zo, name, w0, step, g, lr, wd):
    """The documented rule, by hand: the fp32 update (the path's own arithmetic) rounded with the seeded bits."""
    decay = 0.0 if (name.endswith("bias") or "norm" in name) else wd
    z = zo.z(name, step, 0).view(-1)
    x = w0.float().view(-1) * (1 - lr * decay)
    if zo.z_generator == "torch":
        x = torch.add(x, z, alpha=-lr * g)  # as the chunked update: acc.add_(z, alpha=-lr c)
    else:
        x = x - z * torch.tensor(lr * g, dtype=torch.float32)  # as the fused kernel and its reference
    bits = RoundingBits(rounding_seed(zo.run_seed, step, name), "cpu", zo.z_generator).take(x.numel())
    return stochastic_round(x, torch.bfloat16, bits).view(w0.shape)


@pytest.mark.parametrize("z_generator", ["torch", "philox"])
def test_bf16_default_keeps_no_copy_and_rounds_the_fp32_update_with_the_seeded_bits(z_generator):
    model = TwoLayer().to(torch.bfloat16)
    zo = ZOParameters(model, run_seed=5, z_generator=z_generator)  # master_weights="auto"
    assert zo.masters == {}  # nothing per trained parameter beyond the weights
    assert zo.rounding == {n: (torch.bfloat16, "stochastic") for n, _ in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zo.apply_update(step=3, coefficients=[(0, 0.7)], lr=1e-2, weight_decay=0.1)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, _expected_rounded_update(zo, n, before[n], 3, 0.7, 1e-2, 0.1)), n
    # The opt-in fp32 masters: an fp32 copy of each bf16 parameter, none of fp32 ones.
    assert set(ZOParameters(TwoLayer().to(torch.bfloat16), run_seed=5, master_weights="fp32").masters) == set(before)
    assert ZOParameters(TwoLayer(), run_seed=5, master_weights="fp32").masters == {}
    with pytest.raises(ValueError, match="unknown master_weights 'fp16'"):
        ZOParameters(TwoLayer(), run_seed=5, master_weights="fp16")


class Wide(nn.Module):
    """32,768 bf16 weights of magnitude 0.01-0.02 (spacing 6.1e-5: an update of 1e-6 is 1/61 of it)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        sign = torch.randint(0, 2, (128, 256), generator=g) * 2 - 1
        self.w = nn.Parameter((sign * (0.01 + 0.01 * torch.rand(128, 256, generator=g))).to(torch.bfloat16))


@pytest.fixture
def one_thread():
    # 1,500 small updates: a second thread only adds synchronisation (and spins on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("z_generator", ["torch", "philox"])
def test_500_tiny_updates_move_bf16_weights_by_their_sum_in_expectation_and_vanish_with_nearest(z_generator, one_thread):
    moved = {}
    for policy in ("auto", "none", "fp32") if z_generator == "torch" else ("auto", "none"):
        model = Wide()
        start = model.w.detach().double().clone()
        zo = ZOParameters(model, run_seed=1, distribution="rademacher", z_generator=z_generator, master_weights=policy)
        expected = torch.zeros(128, 256, dtype=torch.float64)
        for step in range(500):
            zo.apply_update(step, [(0, 1.0)], lr=1e-6)  # every weight moves by -1e-6 z, z = +-1
            expected -= 1e-6 * zo.z("w", step, 0).double()
        moved[policy] = (zo.value("w").double() - start, expected)
    d, e = moved["auto"]
    # Stochastic rounding: E[d] = e. The noise of the slope <d, e> / <e, e> over 32,768 weights is ~0.04.
    slope = (d * e).sum() / (e * e).sum()
    assert 0.8 < slope.item() < 1.2
    assert (d.abs() > 0).float().mean() > 0.3  # weights really moved, by whole bf16 spacings
    d, _ = moved["none"]
    assert torch.equal(d, torch.zeros_like(d))  # round to nearest: every update was lost
    if "fp32" in moved:
        d, e = moved["fp32"]
        assert torch.allclose(d, e, atol=1e-7)  # the fp32 master holds the exact sum


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
