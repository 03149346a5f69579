"""Every trained parameter is perturbed by the ZO forwards (issue 15 item 2).

peft's LoRA on an embedding keeps its adapters in ParameterDicts that ``lora.Embedding.forward`` reads
directly; the perturbation hooks must reach them through that forward, in every ZO path (two forwards,
the paired forward, ZO2 offload, the trainer and the recipe), and a parameter no forward perturbs must stop
training with one line. The reference is plain torch: every trained parameter set to theta +- eps z with
z drawn from its seed, two ordinary forwards.
"""

import copy

import pytest
import torch
from conftest import tiny_recipe
from test_addax import RecordingCollator
from test_offload import tiny
from test_paired import causal_lm_batch, pair_loss_fn
from torch import nn

from zoft import run
from zoft.config import validate_recipe
from zoft.errors import ZoftError
from zoft.losses import verbalizer_loss, verbalizer_scores
from zoft.zo.estimate import paired_spsa, spsa
from zoft.zo.mezo import MeZOConfig, MeZOOptimizer
from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer
from zoft.zo.perturb import ZOParameters, derive_seed, sample_z

torch.set_num_threads(2)

EPS, LR, SEED = 1e-2, 1e-2, 3
TARGETS = ["embed_tokens", "q_proj"]


def lora_on_embedding(seed=5):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # init_lora_weights=False: neither factor is zero, so each one's perturbation changes the loss.
    return get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))


def reference_z(model, run_seed, step):
    """z of every trained parameter from its seed alone (no ZOParameters)."""
    return {
        n: sample_z(p.shape, derive_seed(run_seed, step, 0, n), device=p.device)
        for n, p in model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def reference_projected_grad(model, loss_fn, z, eps):
    """(L(theta + eps z) - L(theta - eps z)) / 2 eps with every trained parameter set by hand."""
    params = dict(model.named_parameters())
    start = {n: params[n].detach().clone() for n in z}
    losses = []
    for sign in (+1, -1):
        for n, zn in z.items():
            params[n].copy_(start[n] + (sign * eps) * zn)
        losses.append(float(loss_fn(model)))
    for n in z:
        params[n].copy_(start[n])
    return (losses[0] - losses[1]) / (2.0 * eps)


def reference_mezo(model, data, steps):
    """Plain-torch MeZO: the reference projected gradient, then theta -= lr * g * z, per step."""
    grads = []
    for step in range(steps):
        batch = data[step]
        z = reference_z(model, SEED, step)
        g = reference_projected_grad(model, lambda m, batch=batch: m(**batch).loss, z, EPS)
        grads.append(g)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, zn in z.items():
                params[n].add_(zn, alpha=-LR * g)
    return grads


def zoft_mezo(model, data, steps, *, paired, offload):
    zo = ZOParameters(model, run_seed=SEED)
    grads = []
    if offload:
        opt = DeferredMeZOOptimizer(zo, lr=LR, offloader=BlockOffloader(model, "cpu", "cpu"))
    else:
        opt = MeZOOptimizer(zo, lr=LR)
    for step in range(steps):
        batch = data[step]
        if paired:
            n, width = batch["input_ids"].shape
            estimates = paired_spsa(zo, pair_loss_fn(model, batch), n, step=step, eps=EPS, seq_len=width)
        else:
            estimates = spsa(zo, lambda batch=batch: model(**batch).loss, step=step, eps=EPS)
        opt.record(step, estimates[0])
        grads.append(estimates[0].projected_grad)
        opt.step()
    opt.flush()
    return grads


@pytest.mark.parametrize("paired,offload", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["two_forwards", "paired", "offload", "offload_paired"])
def test_mezo_with_lora_on_the_embedding_is_plain_torch_mezo_over_every_adapter(paired, offload):
    data = [causal_lm_batch(seed) for seed in range(2)]
    model, ref = lora_on_embedding(), lora_on_embedding()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_embedding_A" in n for n in names) and any("lora_embedding_B" in n for n in names)

    expected = reference_mezo(ref, data, 2)
    got = zoft_mezo(model, data, 2, paired=paired, offload=offload)
    # Same z, same additions: exact on CPU fp32 (the paired forward is exact here too, see test_paired.py).
    assert got == expected
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n

    # The embedding adapters matter: leaving them unperturbed (the old behaviour) gives another estimate.
    frozen = lora_on_embedding()
    z = {n: t for n, t in reference_z(frozen, SEED, 0).items() if "lora_embedding" not in n}
    partial = reference_projected_grad(frozen, lambda m: m(**data[0]).loss, z, EPS)
    assert abs(partial - expected[0]) > 1e-3 * abs(expected[0])


class ReadsAWeightDirectly(nn.Module):
    """``head.weight`` is used without calling ``head``: no forward of its holder ever runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x, labels=None):
        logits = self.body(x) @ self.head.weight.T
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("paired", [False, True], ids=["two_forwards", "paired"])
def test_a_trained_parameter_no_forward_perturbs_stops_training_in_one_line(paired):
    model = ReadsAWeightDirectly()
    zo = ZOParameters(model, run_seed=0)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ZoftError) as info:
        if paired:
            pair = lambda: tuple(half.sum() for half in model(torch.cat([x, x]))["logits"].split(3))  # noqa: E731
            paired_spsa(zo, pair, 3, step=0, eps=EPS)
        else:
            spsa(zo, lambda: model(x, y)["loss"], step=0, eps=EPS)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("zeroth-order training: 1 trained parameter(s) were not perturbed by the model's forward "
                          "(head.weight)")
    assert "freeze them (requires_grad=False)" in msg
    for n, p in model.named_parameters():  # the failed forward restored every stored value
        assert torch.equal(p, before[n]), n
    model.head.weight.requires_grad_(False)  # the fix the message names
    assert len(spsa(ZOParameters(model, run_seed=0), lambda: model(x, y)["loss"], step=0, eps=EPS)) == 1


def test_zoft_trainer_refuses_a_parameter_no_forward_perturbs_before_any_update(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from zoft.trainer import ZoftTrainer

    model = ReadsAWeightDirectly()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_dict({"x": torch.randn(8, 4).tolist(), "labels": [0, 1] * 4}).with_format("torch")
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                             save_strategy="no", use_cpu=True, learning_rate=1e-2, remove_unused_columns=False)
    trainer = ZoftTrainer(model=model, args=args, train_dataset=data, zo=MeZOConfig(eps=EPS))
    with pytest.raises(ZoftError, match=r"not perturbed by the model's forward \(head.weight\)"):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # stopped before the first update


# -- the recipe path and the plain ZoftTrainer ------------------------------------------------------------


def _recipe(tiny_llama_dir, sentiment_csv, out, paired=False):
    return validate_recipe(tiny_recipe(
        tiny_llama_dir, sentiment_csv, out,
        method={"name": "mezo", "eps": EPS, "paired_forward": paired},
        peft={"method": "lora", "r": 2, "target_modules": TARGETS},
        train={"max_steps": 1, "save_strategy": "no", "logging_steps": 1}))


def _verbalizer_loss(model, batch):
    return verbalizer_loss(verbalizer_scores(model, batch), batch["cls_labels"])


@pytest.mark.parametrize("how", ["recipe", "recipe_paired", "zoft_trainer"])
def test_first_step_with_lora_on_embed_tokens_and_q_proj_equals_the_plain_torch_estimate(
    tiny_llama_dir, sentiment_csv, tmp_path, how
):
    recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "run", paired=how == "recipe_paired")
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    if how == "zoft_trainer":  # the same model, data and arguments through a hand-built ZoftTrainer
        from zoft.trainer import ZoftTrainer

        trainer = ZoftTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                              data_collator=trainer.data_collator, zo=MeZOConfig(eps=EPS))
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_embedding_A" in n for n in names)
    ref = copy.deepcopy(trainer.model).eval()
    trainer.train()

    (g,) = [h["zo_projected_grad"] for h in trainer.state.log_history if "zo_projected_grad" in h]
    batch = trainer.data_collator.batches[0]
    expected = reference_projected_grad(ref, lambda m: _verbalizer_loss(m, batch),
                                        reference_z(ref, trainer.args.seed, 0), EPS)
    # The paired forward scores a doubled batch (other matmul shapes on CPU): equal to rounding there.
    assert g == (pytest.approx(expected, rel=1e-4) if how == "recipe_paired" else expected)
