"""LoRA-GA: step-0 output, first-step alignment with full fine-tuning, the plain-LoRA export, memory."""

import conftest
import pytest
import torch
from peft import IA3Config, PeftModel
from transformers import LlamaForCausalLM

from zoft.errors import ZoftError
from zoft.lora.ga import estimate_target_gradients, init_lora_ga, save_lora_ga_adapter

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


def tiny_llama(seed=0):
    return conftest.tiny_llama(seed).eval()


def fixed_batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern (each next token = previous + 1) so the gradient has a dominant direction.
    out = []
    for _ in range(n):
        start = torch.randint(0, 100, (4, 1), generator=g)
        ids = (start + torch.arange(16)) % 128
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def load_base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def target_weights(model):
    return {
        name: module.weight
        for name, module in model.named_modules()
        if name.split(".")[-1] in TARGETS and isinstance(module, torch.nn.Linear)
    }


@pytest.mark.parametrize("scale", ["paper", "stable"])
def test_output_unchanged_after_init(base_dir, scale):
    batches = fixed_batches()
    reference = logits(load_base(base_dir), batches[0])
    model = init_lora_ga(load_base(base_dir), LORA, batches, num_batches=3, scale=scale).eval()
    # The adapters are far from zero: the offset, not a zero product, keeps the output.
    assert max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n) > 1e-3
    torch.testing.assert_close(logits(model, batches[0]), reference, atol=1e-5, rtol=0)


def test_gradient_estimate_matches_plain_autograd(base_dir):
    batches = fixed_batches()
    reference_model = load_base(base_dir).train()
    for batch in batches:
        reference_model(**batch).loss.backward()
    model = load_base(base_dir)
    grads = estimate_target_gradients(model, target_weights(model), batches, num_batches=3)
    expected = {n: p.grad / 3 for n, p in target_weights(reference_model).items()}
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the requires_grad flags are restored


def test_one_target_gradient_alive_at_a_time(base_dir):
    model = load_base(base_dir)
    weights = target_weights(model)
    others = [p for p in model.parameters() if all(p is not w for w in weights.values())]
    seen = []

    def check(param):
        seen.append(sum(w.grad is not None for w in weights.values()))
        assert all(p.grad is None for p in others)

    # Registered before LoRA-GA's own hooks, so each runs while that weight's fresh gradient is set.
    handles = [w.register_post_accumulate_grad_hook(check) for w in weights.values()]
    try:
        init_lora_ga(model, LORA, fixed_batches(), num_batches=3)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3 * len(weights)
    assert max(seen) == 1


def _first_step_cosine(model, batches, full_grads, lr=1e-3):
    """cos(delta W of one SGD step on the adapters, -G), over all target weights together."""
    from peft.tuners.lora.layer import LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    before = {
        n: (m.lora_B["default"].weight.detach().clone(), m.lora_A["default"].weight.detach().clone())
        for n, m in layers.items()
    }
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in batches:
        (model(**batch).loss / len(batches)).backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
    deltas, grads = [], []
    for name, layer in layers.items():
        b0, a0 = before[name]
        s = layer.scaling["default"]
        deltas.append(
            (s * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight - b0 @ a0)).flatten()
        )
        grads.append(full_grads[name.removeprefix("base_model.model.")].flatten())
    delta, grad = torch.cat(deltas), torch.cat(grads)
    return torch.nn.functional.cosine_similarity(delta, -grad, dim=0).item()


def test_first_step_aligned_with_full_gradient(base_dir):
    from peft import LoraConfig, get_peft_model

    batches = fixed_batches()
    reference = load_base(base_dir)
    full_grads = estimate_target_gradients(reference, target_weights(reference), batches, num_batches=3)

    torch.manual_seed(0)
    plain = get_peft_model(load_base(base_dir), LoraConfig(**LORA))
    ga = init_lora_ga(load_base(base_dir), LORA, batches, num_batches=3)
    cos_plain = _first_step_cosine(plain, batches, full_grads)
    cos_ga = _first_step_cosine(ga, batches, full_grads)
    # LoRA-GA's first step is the best rank-2r approximation of the full step: cos = |G_2r| / |G|.
    assert cos_ga > 0.6
    assert cos_ga > cos_plain + 0.3, (cos_ga, cos_plain)


@pytest.mark.parametrize("scale", ["paper", "stable"])
def test_converted_adapter_reloads_on_original_base(base_dir, tmp_path, scale):
    batches = fixed_batches()
    model = init_lora_ga(
        load_base(base_dir), LORA, batches, num_batches=2, scale=scale, initial_adapter_dir=tmp_path / "init"
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = logits(model, batches[0])
    assert (trained - logits(load_base(base_dir), batches[0])).abs().max() > 1e-2  # training moved it
    save_lora_ga_adapter(model, tmp_path / "plain")

    reloaded = PeftModel.from_pretrained(
        load_base(base_dir), tmp_path / "plain"
    ).eval()  # plain peft, no zoft
    torch.testing.assert_close(logits(reloaded, batches[0]), trained, atol=1e-5, rtol=0)
    assert reloaded.peft_config["default"].r == 2 * LORA["r"]


def test_too_few_batches(base_dir):
    with pytest.raises(ZoftError, match="needs 5 gradient batches but the data gives only 3"):
        init_lora_ga(load_base(base_dir), LORA, fixed_batches(3), num_batches=5)
    # An iterable without len() is found short while it is consumed.
    with pytest.raises(ZoftError, match="needs 5 gradient batches but the data gave only 3"):
        init_lora_ga(load_base(base_dir), LORA, iter(fixed_batches(3)), num_batches=5)


def test_bad_configs(base_dir, tmp_path):
    model = load_base(base_dir)
    with pytest.raises(ZoftError, match="needs a LoRA configuration"):
        init_lora_ga(model, None, fixed_batches(), num_batches=1)
    with pytest.raises(ZoftError, match="got a IA3Config; pass a LoraConfig"):
        init_lora_ga(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[]), fixed_batches(), 1)
    with pytest.raises(ZoftError, match="no nn.Linear/Conv1D module matches"):
        init_lora_ga(model, dict(r=2, target_modules=["nope"]), fixed_batches(), 1)
    with pytest.raises(ZoftError, match="must contain 'labels'"):
        init_lora_ga(model, LORA, [{"input_ids": fixed_batches()[0]["input_ids"]}], 1)
    with pytest.raises(ZoftError, match="unknown scale"):
        init_lora_ga(model, LORA, fixed_batches(), 1, scale="big")
    ga = init_lora_ga(load_base(base_dir), LORA, fixed_batches(), 1)
    with pytest.raises(ZoftError, match="not a PeftModel"):
        init_lora_ga(ga, LORA, fixed_batches(), 1)
    with pytest.raises(ZoftError, match="needs the step-0 adapter"):
        save_lora_ga_adapter(ga, tmp_path / "out")


@pytest.mark.parametrize("gamma", [2.5, 0.5])
def test_stable_scale_keeps_a_non_integer_gamma(base_dir, gamma):
    # peft's "stable" scale: B = U[:, r:2r] diag(S[r:2r]) * out**0.25 / sqrt(gamma); gamma 2.5 was cut to 2
    # (B 12% too large) and 0.5 to 0 (a division by zero) when handed to peft as an int.
    batches = fixed_batches()
    reference = load_base(base_dir)
    grads = estimate_target_gradients(reference, target_weights(reference), batches, num_batches=3)
    model = init_lora_ga(load_base(base_dir), LORA, batches, num_batches=3, scale="stable", stable_gamma=gamma)
    r = LORA["r"]
    checked = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_B") and "default" in module.lora_B):
            continue
        grad = grads[name.removeprefix("base_model.model.")]
        singular = torch.linalg.svdvals(grad.double())
        expected = singular[r : 2 * r] * grad.shape[0] ** 0.25 / gamma**0.5
        column_norms = module.lora_B["default"].weight.double().norm(dim=0)  # sign-free: |U_j| = 1
        torch.testing.assert_close(column_norms, expected, rtol=1e-2, atol=0)
        checked += 1
    assert checked == 2 * len(TARGETS)
    assert model.peft_config["default"].lora_ga_config.stable_gamma == gamma  # saved as given
