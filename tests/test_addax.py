"""Addax: the mixed update against its formula, no full gradient held, the length split of the loaders,
and the exact degenerate cases (alpha=0 is plain SGD, all-long data with alpha=1 is MeZO)."""

import pytest
import torch
from conftest import tiny_recipe
from torch import nn

from zoft import run
from zoft.config import validate_recipe
from zoft.errors import RecipeError, ZoftError
from zoft.losses import verbalizer_loss, verbalizer_scores
from zoft.zo.addax import activation_bytes, addax_step, auto_length_threshold, check_split, split_by_length
from zoft.zo.perturb import ZOParameters

torch.set_num_threads(2)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_addax_step_is_the_mixed_update_and_never_holds_a_full_gradient():
    model, ref = _mlp(), _mlp()
    x_long, x_short, y_long, y_short = torch.randn(5, 6), torch.randn(4, 6), torch.randn(5, 3), torch.randn(4, 3)
    zo = ZOParameters(model, run_seed=3)
    lr, alpha, eps, step = 0.1, 0.3, 1e-3, 7

    live_grads = []

    def probe(_param):  # registered first, so it fires before addax's hook on the same parameter
        live_grads.append(sum(p.grad is not None for p in model.parameters()))

    probes = [p.register_post_accumulate_grad_hook(probe) for p in model.parameters()]

    def zo_loss():
        return nn.functional.mse_loss(model(x_long), y_long)

    def fo_backward():
        loss = nn.functional.mse_loss(model(x_short), y_short)
        loss.backward()
        return loss

    result = addax_step(zo, step=step, lr=lr, alpha=alpha, eps=eps, zo_loss=zo_loss, fo_backward=fo_backward)
    for h in probes:
        h.remove()
    assert live_grads == [1] * 4  # each hook saw only its own gradient
    assert all(p.grad is None for p in model.parameters())
    assert result.in_place_updates == 4

    # Reference at the same theta: g0 from the two perturbed losses, grad1 by autograd, z from the seeds.
    ref_zo = ZOParameters(ref, run_seed=3)
    with torch.no_grad():
        with ref_zo.perturbed(step, 0, eps):
            lp = nn.functional.mse_loss(ref(x_long), y_long).item()
        with ref_zo.perturbed(step, 0, -eps):
            lm = nn.functional.mse_loss(ref(x_long), y_long).item()
    g0 = (lp - lm) / (2 * eps)
    assert result.coefficients[0][1] == pytest.approx(alpha * g0, rel=1e-12)
    grads = torch.autograd.grad(nn.functional.mse_loss(ref(x_short), y_short), list(ref.parameters()))
    for (name, p), g1 in zip(ref.named_parameters(), grads):
        expected = p.detach() - lr * (alpha * g0 * ref_zo.z(name, step, 0) + (1 - alpha) * g1)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-6, atol=1e-7)


def test_bf16_addax_step_rounds_the_fp32_mixed_update_once_with_the_seeded_bits():
    from zoft.zo.lowprec import RoundingBits, rounding_seed, stochastic_round

    model, ref = _mlp().to(torch.bfloat16), _mlp().to(torch.bfloat16)
    x_long, x_short, y_long, y_short = (torch.randn(5, 6), torch.randn(4, 6), torch.randn(5, 3), torch.randn(4, 3))
    x_long, x_short = x_long.bfloat16(), x_short.bfloat16()
    zo = ZOParameters(model, run_seed=3)
    assert zo.masters == {}  # bf16 without fp32 copies (master_weights auto)
    lr, alpha, eps, step, wd = 1e-3, 0.3, 1e-3, 7, 0.1

    def zo_loss():
        return nn.functional.mse_loss(model(x_long).float(), y_long)

    def fo_backward():
        loss = nn.functional.mse_loss(model(x_short).float(), y_short)
        loss.backward()
        return loss

    result = addax_step(zo, step=step, lr=lr, alpha=alpha, eps=eps, zo_loss=zo_loss, fo_backward=fo_backward,
                        weight_decay=wd)
    c = result.coefficients[0][1]
    grads = torch.autograd.grad(nn.functional.mse_loss(ref(x_short).float(), y_short), list(ref.parameters()))
    for (name, p), g1 in zip(ref.named_parameters(), grads):
        # The documented rule: fp32 (decay, first-order term, z term, in that order), rounded once.
        d = 0.0 if name.endswith("bias") else wd
        x = p.detach().float().reshape(-1) * (1 - lr * d)
        x = torch.add(x, g1.reshape(-1).float(), alpha=-lr * (1 - alpha))
        x = torch.add(x, zo.z(name, step, 0).view(-1), alpha=-lr * c)
        bits = RoundingBits(rounding_seed(3, step, name), "cpu", "torch").take(x.numel())
        expected = stochastic_round(x, torch.bfloat16, bits).view(p.shape)
        assert torch.equal(dict(model.named_parameters())[name].detach(), expected), name


def test_split_and_one_sided_threshold_message():
    lengths = [5, 9, 12, 30, 31]
    assert split_by_length(lengths, 12) == ([3, 4], [0, 1, 2])
    with pytest.raises(ZoftError, match=r"4 leaves the first-order .* empty: 5 of 5 .* longer than 4 tokens and 0 are"):
        check_split(lengths, 4, alpha=0.5)
    with pytest.raises(ZoftError, match=r"31 leaves the zeroth-order \(longer\) side empty: 0 of 5 .* and 5 are not"):
        check_split(lengths, 31, alpha=0.5)
    check_split(lengths, 31, alpha=0.0)  # all short, ZO weight 0: in-place SGD
    check_split(lengths, 0, alpha=1.0)  # all long, FO weight 0: MeZO


def test_auto_threshold_is_the_longest_first_order_batch_that_fits():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    model = LlamaForCausalLM(cfg)
    weights = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    # Korthikanti et al. per layer b*s*h*(34 + 5*a*s/h) at 16-bit, fp32 here (x2), + fp32 logits and grad.
    assert activation_bytes(100, 8, cfg, 4) == int(2 * 8 * 100 * 64 * (34 + 5 * 4 * 100 / 64) * 2 + 2 * 8 * 100 * 1000 * 4)
    # + 1 kB: well inside the ~0.2 MB step from length 77 to 78, above buffers and float rounding.
    budget = (weights + 2 * largest + activation_bytes(77, 8, cfg, 4) + 1000) / 1e9
    assert auto_length_threshold(model, budget, 8, 512) == 77
    assert auto_length_threshold(model, budget, 8, 50) == 50  # capped by the data's longest sequence
    with pytest.raises(ZoftError, match="memory_budget_gb"):
        auto_length_threshold(model, weights / 1e9, 8, 512)


class RecordingCollator:
    """Wraps the run's collator and keeps every batch it builds (the batches the trainer trains on)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, rows):
        batch = self.inner(rows)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def _trainer(recipe_dict):
    recipe = validate_recipe(recipe_dict)
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    return trainer


def _lengths(batch):
    return batch["attention_mask"].sum(-1).tolist()


def test_alpha_zero_is_plain_torch_sgd_on_the_same_batches(tiny_llama_dir, sentiment_csv, tmp_path):
    lr = 0.05
    trainer = _trainer(tiny_recipe(
        tiny_llama_dir, sentiment_csv, tmp_path / "a",
        method={"name": "addax", "alpha": 0.0, "length_threshold": 1000, "fo_batch_size": 4},
        train={"learning_rate": lr, "max_steps": 2, "save_strategy": "no"}))
    trainer.train()
    batches = trainer.data_collator.batches[:2]
    assert len(batches) == 2 and all(len(b["cls_labels"]) == 4 for b in batches)

    ref, _ = run.build_model_and_tokenizer(validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path)))
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for batch in batches:
        opt.zero_grad()
        verbalizer_loss(verbalizer_scores(ref, batch), batch["cls_labels"]).backward()
        opt.step()
    moved = 0.0
    for (name, p), (_, r) in zip(trainer.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (r.detach() - start[name]).abs().max().item())
    assert moved > 1e-3
    assert trainer.zo_optimizer is not None and not trainer._zo_window  # no ZO forward ran


def test_all_long_data_with_alpha_one_is_exactly_mezo(tiny_llama_dir, sentiment_csv, tmp_path):
    train = {"max_steps": 3, "save_strategy": "no", "per_device_train_batch_size": 4}
    mezo = _trainer(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "m", train=train))
    addax = _trainer(tiny_recipe(
        tiny_llama_dir, sentiment_csv, tmp_path / "x", train=train,
        method={"name": "addax", "alpha": 1.0, "length_threshold": 0, "zo_batch_size": 4}))
    mezo.train()
    addax.train()
    for a, b in zip(mezo.data_collator.batches[:3], addax.data_collator.batches[:3]):
        assert torch.equal(a["input_ids"], b["input_ids"])
    ga = [h["zo_projected_grad"] for h in mezo.state.log_history if "zo_projected_grad" in h]
    gb = [h["zo_projected_grad"] for h in addax.state.log_history if "zo_projected_grad" in h]
    assert ga and ga == gb
    for (name, p), (_, q) in zip(mezo.model.named_parameters(), addax.model.named_parameters()):
        assert torch.equal(p, q), name


def test_mixed_run_feeds_long_rows_to_zo_and_short_rows_to_fo(tiny_llama_dir, sentiment_csv, tmp_path):
    # The sentiment rows tokenize to 11-14 tokens; 12 splits them.
    trainer = _trainer(tiny_recipe(
        tiny_llama_dir, sentiment_csv, tmp_path / "mix",
        method={"name": "addax", "alpha": 0.5, "length_threshold": 12, "zo_batch_size": 3, "fo_batch_size": 2},
        train={"learning_rate": 1e-2, "max_steps": 2, "save_strategy": "no"}))
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    n_long = sum(n > 12 for n in lengths)
    assert 0 < n_long < len(lengths)
    loader = trainer.get_train_dataloader()
    assert len(loader) == max(-(-n_long // 3), -(-(len(lengths) - n_long) // 2))
    for i, batch in enumerate(loader):
        if i == 3:
            break
        assert len(batch["zo"]["cls_labels"]) == 3 and min(_lengths(batch["zo"])) > 12
        assert len(batch["fo"]["cls_labels"]) == 2 and max(_lengths(batch["fo"])) <= 12
    trainer.train()
    assert [h for h in trainer.state.log_history if "zo_projected_grad" in h]


def test_misuse_is_one_line(tiny_llama_dir, sentiment_csv, tmp_path):
    base = dict(model_dir=tiny_llama_dir, data_path=sentiment_csv, out_dir=tmp_path / "x")
    recipe = validate_recipe(tiny_recipe(**base, method={"name": "addax", "length_threshold": 100}))
    with pytest.raises(ZoftError, match=r"method.length_threshold: 100 leaves the zeroth-order .* 0 of 64"):
        run.build_trainer(recipe)
    for method, train, match in [
        ({"name": "addax", "length_threshold": 12}, {"optim": "adamw_torch"},
         "train.optim: first-order-only option; method 'addax' updates each parameter in place"),
        ({"name": "addax"}, {}, "method.length_threshold: required for addax"),
        ({"name": "addax", "length_threshold": "auto"}, {}, "needs method.memory_budget_gb"),
        ({"name": "addax", "length_threshold": 12}, {"gradient_accumulation_steps": 2},
         "train.gradient_accumulation_steps: addax applies its update during the backward"),
        ({"name": "mezo", "alpha": 0.1}, {}, "method.alpha: only used by method 'addax'"),
    ]:
        with pytest.raises(RecipeError) as info:
            validate_recipe(tiny_recipe(**base, method=method, train=train))
        assert len(info.value.lines) == 1 and match in info.value.lines[0], info.value.lines


def test_the_shorter_side_is_reshuffled_at_every_restart_and_epoch(tiny_llama_dir, sentiment_csv, tmp_path):
    # 22 long rows in batches of 8: the long side makes 3 batches and restarts after each 3 of the 6 steps.
    trainer = _trainer(tiny_recipe(
        tiny_llama_dir, sentiment_csv, tmp_path / "r",
        method={"name": "addax", "alpha": 0.5, "length_threshold": 12, "zo_batch_size": 8, "fo_batch_size": 8}))
    loader = trainer.get_train_dataloader()
    assert len(loader) == 6 and len(loader.zo_loader) == 3
    passes = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        steps = [b["zo"]["input_ids"].tolist() for b in loader]
        passes += [steps[:3], steps[3:]]
    assert all(sorted(sum(p, [])) == sorted(sum(passes[0], [])) for p in passes)  # each pass: every long row once
    assert len({str(p) for p in passes}) == len(passes)  # and in an order of its own


@pytest.mark.parametrize("killed_at", [5, 9], ids=["epoch0", "epoch1"])
def test_addax_run_killed_mid_epoch_resumes_to_exactly_the_uninterrupted_weights(
    tiny_llama_dir, sentiment_csv, tmp_path, killed_at
):
    from conftest import train_until_killed
    from test_mezo_trainer import _weights

    from zoft import checkpoints

    # 22 long rows in 3 batches, 42 short in 6: an epoch is 6 steps and the long side restarts after 3. The
    # run resumes from checkpoint-4 (epoch 0, long side in its second pass) or checkpoint-8 (epoch 1, step 2).
    settings = {
        "method": {"name": "addax", "alpha": 0.5, "length_threshold": 12, "zo_batch_size": 8, "fo_batch_size": 8},
        "train": {"learning_rate": 1e-2, "max_steps": 10, "save_steps": 4},
    }
    straight = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "straight", **settings))
    run.train(straight)

    killed = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "killed", **settings))
    del_me = train_until_killed(killed, killed_at)
    del del_me
    resumed_from = checkpoints.latest_complete_checkpoint(tmp_path / "killed").name
    assert resumed_from == f"checkpoint-{killed_at - 1}"
    run.train(killed.model_copy(update={"output": killed.output.model_copy(update={"resume": True})}))

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    start = _weights(tiny_llama_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # the runs did train
