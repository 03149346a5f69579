"""Zeroth-order methods with ``train.fp16`` / ``train.bf16`` (HF mixed precision, issue 15 item 6).

MeZO runs its forwards under the autocast HF sets up and scales nothing: its projected gradient and update
are those of plain forwards under the same autocast. Addax's first-order part applies the unscaled gradient
(bf16), and fp16, whose loss scale it cannot honour, is refused in one line.

On a CPU accelerate turns ``fp16`` into nothing (no autocast, no GradScaler); on CUDA it sets native AMP and a
``torch.amp.GradScaler``. :func:`as_accelerate_sets_up_fp16_on_cuda` gives a CPU trainer that same state, with
the real GradScaler on the CPU, so the CUDA failure ("_scale is None" at the first step) shows here.
"""

import copy

import pytest
import torch
from conftest import tiny_recipe
from test_addax import RecordingCollator
from test_zo_coverage import reference_projected_grad, reference_z

from zoft import run
from zoft.config import validate_recipe
from zoft.errors import RecipeError, ZoftError
from zoft.losses import verbalizer_loss, verbalizer_scores
from zoft.zo.addax import FP16_REFUSAL, AddaxConfig

torch.set_num_threads(2)

EPS, LR = 1e-3, 1e-2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def as_accelerate_sets_up_fp16_on_cuda(trainer):
    """accelerate's fp16 state on a CUDA device (``Accelerator.__init__``: native AMP and a GradScaler), on CPU."""
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    return trainer


def under_autocast(model, dtype, device="cpu"):
    """``model`` whose forward runs under autocast and returns fp32 logits (what accelerate's prepare does)."""
    inner = model.forward

    def forward(*args, **kwargs):
        with torch.autocast(device, dtype=dtype):
            out = inner(*args, **kwargs)
        out["logits"] = out["logits"].float()
        return out

    model.forward = forward
    return model


def _trainer(tiny_llama_dir, sentiment_csv, out, precision, method):
    recipe = validate_recipe(tiny_recipe(
        tiny_llama_dir, sentiment_csv, out, method=method,
        train={precision: True, "use_cpu": True, "learning_rate": LR, "max_steps": 1, "save_strategy": "no",
               "logging_steps": 1}))
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    if precision == "fp16":
        as_accelerate_sets_up_fp16_on_cuda(trainer)
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    return trainer


def _loss(model, batch):
    return verbalizer_loss(verbalizer_scores(model, batch), batch["cls_labels"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mezo_under_mixed_precision_is_the_autocast_estimate_and_update_with_no_loss_scale(
    tiny_llama_dir, sentiment_csv, tmp_path, precision
):
    trainer = _trainer(tiny_llama_dir, sentiment_csv, tmp_path / "run", precision, {"name": "mezo", "eps": EPS})
    start = copy.deepcopy(trainer.model).eval()
    trainer.train()  # fp16: failed at the first optimizer step with "_scale is None" before

    batch = trainer.data_collator.batches[0]
    (g,) = [h["zo_projected_grad"] for h in trainer.state.log_history if "zo_projected_grad" in h]
    z = reference_z(start, trainer.args.seed, 0)
    expected = reference_projected_grad(under_autocast(copy.deepcopy(start), DTYPES[precision]),
                                        lambda m: _loss(m, batch), z, EPS)
    assert g == expected
    # The forwards did run in half precision: the fp32 estimate is another number.
    assert reference_projected_grad(copy.deepcopy(start), lambda m: _loss(m, batch), z, EPS) != expected
    # theta - lr * g * z, nothing scaled.
    trained = dict(trainer.model.named_parameters())
    for name, p in start.named_parameters():
        assert torch.equal(trained[name].detach(), p.detach().add(z[name], alpha=-LR * g)), name


def test_addax_under_bf16_applies_the_unscaled_autocast_gradient(tiny_llama_dir, sentiment_csv, tmp_path):
    # alpha 0: the step is the first-order part alone, theta - lr * grad of the short batch's loss.
    method = {"name": "addax", "alpha": 0.0, "length_threshold": 1000, "fo_batch_size": 4}
    trainer = _trainer(tiny_llama_dir, sentiment_csv, tmp_path / "run", "bf16", method)
    ref = under_autocast(copy.deepcopy(trainer.model), torch.bfloat16)
    trainer.train()

    batch = trainer.data_collator.batches[0]
    params = [p for p in ref.parameters() if p.requires_grad]
    grads = torch.autograd.grad(_loss(ref, batch), params)
    assert any(g.abs().max() > 0 for g in grads)
    trained = dict(trainer.model.named_parameters())
    for (name, p), grad in zip(((n, p) for n, p in ref.named_parameters() if p.requires_grad), grads):
        assert torch.equal(trained[name].detach(), p.detach().add(grad, alpha=-LR)), name


def test_addax_with_train_fp16_is_refused_in_one_line(tiny_llama_dir, sentiment_csv, tmp_path):
    method = {"name": "addax", "alpha": 0.5, "length_threshold": 12}
    with pytest.raises(RecipeError) as info:
        validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, method=method, train={"fp16": True}))
    assert info.value.lines == [f"recipe: {FP16_REFUSAL}"]
    assert "train.fp16" in FP16_REFUSAL and "train.bf16" in FP16_REFUSAL

    # A hand-built ZoftTrainer is refused too, before it trains anything.
    from transformers import TrainingArguments

    from zoft.trainer import ZoftTrainer
    from zoft.zo.mezo import MeZOConfig

    built = run.build_trainer(validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "b")))
    args = TrainingArguments(str(tmp_path / "x"), fp16=True, use_cpu=True, report_to="none", max_steps=1)
    with pytest.raises(ZoftError) as info:
        ZoftTrainer(model=built.model, args=args, train_dataset=built.train_dataset, zo=MeZOConfig(),
                    addax=AddaxConfig(length_threshold=12))
    assert str(info.value) == FP16_REFUSAL


@pytest.mark.gpu
def test_mezo_with_train_fp16_on_cuda_runs_under_autocast_with_no_loss_scale(tiny_llama_dir, sentiment_csv, tmp_path):
    # The real CUDA setup (accelerate's GradScaler and fp16 autocast), z from torch.Generator on the GPU.
    recipe = validate_recipe(tiny_recipe(
        tiny_llama_dir, sentiment_csv, tmp_path / "run", method={"name": "mezo", "eps": EPS, "z_generator": "torch"},
        train={"fp16": True, "learning_rate": LR, "max_steps": 1, "save_strategy": "no", "logging_steps": 1}))
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    assert trainer.accelerator.scaler is not None  # what failed with "_scale is None" before
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    start = copy.deepcopy(trainer.model).cuda().eval()
    trainer.train()
    batch = {k: v.cuda() for k, v in trainer.data_collator.batches[0].items()}
    (g,) = [h["zo_projected_grad"] for h in trainer.state.log_history if "zo_projected_grad" in h]
    z = reference_z(start, trainer.args.seed, 0)
    expected = reference_projected_grad(under_autocast(copy.deepcopy(start), torch.float16, "cuda"),
                                        lambda m: _loss(m, batch), z, EPS)
    assert g == pytest.approx(expected, rel=1e-5)
    trained = dict(trainer.model.named_parameters())
    for name, p in start.named_parameters():
        torch.testing.assert_close(trained[name].detach(), p.detach().add(z[name], alpha=-LR * g))
