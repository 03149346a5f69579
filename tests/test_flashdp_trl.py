"""FlashDP through ZoftCallback on TRL's SFTTrainer, as a new user sets it up (issue 22).

The user's script: ``SFTTrainer(model=<a model folder>, args=SFTConfig(...), train_dataset=<a text or
prompt/completion column>, peft_config=LoraConfig(...), callbacks=[ZoftCallback(privacy={...})])`` with
SFTConfig's defaults (gradient checkpointing, bf16, the token-mean NLL, no packing) plus only what
docs/callback.md says to change for FlashDP: ``max_grad_norm=0`` and ``dataloader_drop_last=True``
(and ``use_cpu=True``, which HF itself asks for on a machine without a GPU when bf16 is on).
"""

import pytest
import torch

from zoft.callback import ZoftCallback
from zoft.errors import ZoftError
from zoft.privacy import epsilon_spent

trl = pytest.importorskip("trl")

torch.set_num_threads(2)

SIGMA, CLIP, BATCH, STEPS = 1.0, 0.05, 4, 4
LORA = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
FOR_FLASHDP = {"max_grad_norm": 0.0, "dataloader_drop_last": True}  # what docs/callback.md says to change
ON_CPU = {"use_cpu": True, "report_to": "none", "disable_tqdm": True}  # HF's own requirement here, not FlashDP's


def _data(kind):
    from datasets import Dataset

    words = ["a joy to watch", "a dull mess", "brilliant and moving", "tedious and flat"]
    # Lengths vary, so a token mean over the batch weighs the examples unequally: the per-example loss matters.
    texts = [f"Review {i}: {words[i % 4]}" + " and more" * (i % 5) for i in range(16)]
    if kind == "text":
        return Dataset.from_dict({"text": texts})
    return Dataset.from_dict({"prompt": [t + "\nSentiment:" for t in texts],
                              "completion": [" great" if i % 2 == 0 else " terrible, really" for i in range(16)]})


def _sft_trainer(model_dir, out, data, callbacks, **config):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, seed=3, **ON_CPU,
                     **config)
    return SFTTrainer(model=model_dir, args=args, train_dataset=data, peft_config=LoraConfig(**LORA),
                      callbacks=callbacks)


class _Observer:
    """Records, for the last training step, the batch and the LoRA weights the forward saw and the ``.grad``
    left by the backward (the clipped sum, before the callback adds noise in on_pre_optimizer_step)."""

    def __init__(self, trainer):
        self.model = trainer.model
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.model.register_forward_pre_hook(self._forward, with_kwargs=True)
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self.grads.__setitem__(name, p.grad.clone()))
        self.batch, self.weights, self.grads = None, None, {}

    def _forward(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.batch = {k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels")}
            self.weights = {n: p.detach().clone() for n, p in self.params.items()}


def _per_example_grads(model_dir, weights, batch):
    """Each example's gradient of its own loss (HF's mean NLL over its label tokens, the example alone, without
    padding), by torch.func, in the bf16 autocast the SFTConfig default trains in."""
    from peft import LoraConfig, get_peft_model
    from torch.func import functional_call, grad
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**LORA)).eval()
    params = {n: weights[n] for n, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(weights)

    def loss(p, ids, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return functional_call(model, (p,), args=(), kwargs={"input_ids": ids, "labels": labels}).loss.float()

    rows = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())  # right padding: the example is its first n tokens
        rows.append(grad(loss)(params, batch["input_ids"][i : i + 1, :n], batch["labels"][i : i + 1, :n]))
    return {k: torch.stack([r[k] for r in rows]) for k in params}


@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_sft_trainer_with_the_callback_clips_each_example_and_reports_epsilon(kind, tiny_llama_dir, tmp_path):
    # Regression (issue 22): TRL's compute_loss reads outputs.log_probs; the callback returned {"loss": ...}.
    data = _data(kind)
    callback = ZoftCallback(privacy={"noise_multiplier": SIGMA, "clip_bound": CLIP, "sampling": "shuffle"})
    trainer = _sft_trainer(tiny_llama_dir, tmp_path, data, [callback], **FOR_FLASHDP)
    assert trainer.args.gradient_checkpointing and trainer.args.bf16 and not trainer.args.packing  # TRL's defaults
    observer = _Observer(trainer)
    trainer.train()
    assert trainer.state.global_step == STEPS

    # Epsilon: the accountant's for q = B / N, sigma and the steps taken; TRL's own metrics are logged too.
    n = len(trainer.train_dataset)
    report = callback.privacy_report()
    want = epsilon_spent(BATCH / n, SIGMA, STEPS, 1 / n**1.1)
    assert report["epsilon"] == pytest.approx(want, rel=1e-12) and report["steps"] == STEPS
    assert report["adjacency"] == "replace_one" and report["proven_bound"] is False
    final = trainer.state.log_history[-1]
    assert final["dp_epsilon"] == pytest.approx(want, rel=1e-12)
    assert {"entropy", "mean_token_accuracy"} <= set(final)
    assert not any("grad_norm" in h for h in trainer.state.log_history)

    # The last step's clipped sum equals sum_i clip_l(g_i,l) over the batch's examples, g_i each example's
    # gradient of its own mean token loss (torch.func), so one example moves it by at most C.
    per_example = _per_example_grads(tiny_llama_dir, observer.weights, observer.batch)
    handle_bounds = {name: CLIP / len(per_example) ** 0.5 for name in per_example}  # C split evenly over L tensors
    clipped_any = False
    total_sq = torch.zeros(BATCH)
    for name, g in per_example.items():
        norms = g.flatten(1).norm(dim=1)
        factors = (handle_bounds[name] / (norms + 1e-6)).clamp(max=1.0)
        clipped_any |= bool((factors < 1).any())
        total_sq += (factors * norms) ** 2
        expected = torch.tensordot(factors, g, dims=1)
        # bf16 autocast on both sides, with different op orders: agree to about 1e-2 of the layer's scale
        torch.testing.assert_close(observer.grads[name], expected, rtol=0, atol=2e-2 * expected.abs().max() + 1e-9)
    assert clipped_any  # the bound was active
    assert bool((total_sq.sqrt() <= CLIP * (1 + 1e-5)).all())
    # the callback gave the model back: no FlashDP layer forwards, and the forward it had (accelerate's autocast
    # wrapper under bf16), not the callback's
    assert not any("_zoft_flashdp" in m.__dict__ for m in trainer.model.modules())
    assert "_patch_forward" not in getattr(trainer.model.forward, "__qualname__", "")


def test_sft_trainer_settings_that_break_flashdp_are_refused_together(tiny_llama_dir, tmp_path):
    # Regression (issue 22): each refusal came alone, so a user needed one round trip per setting.
    callback = ZoftCallback(privacy={"noise_multiplier": SIGMA, "clip_bound": CLIP, "sampling": "shuffle"})
    trainer = _sft_trainer(tiny_llama_dir, tmp_path, _data("text"), [callback], packing=True, padding_free=True,
                           loss_type="dft")
    with pytest.raises(ZoftError) as info:
        trainer.train()
    assert str(info.value) == (
        "ZoftCallback(privacy=...): "
        "SFTConfig.max_grad_norm=1.0: global clipping after per-sample clipping breaks the privacy guarantee; set "
        "max_grad_norm=0; "
        "set SFTConfig(dataloader_drop_last=True): the accounting assumes every step has per_device_train_batch_size "
        "x gradient_accumulation_steps examples; "
        "SFTConfig(packing=True) puts several examples into one row, which per-example clipping would clip as one "
        "and the accounting would miscount; set packing=False; "
        "SFTConfig(padding_free=True) concatenates the batch's examples into one row, which per-example clipping "
        "would clip as one; set padding_free=False; "
        "SFTConfig(loss_type='dft') weights tokens by their probability, and FlashDP clips each example's mean token "
        "NLL; set loss_type='nll'"
    )
    assert trainer.state.global_step == 0  # refused before any step


def test_log_prob_gradient_is_each_examples_mean_token_loss_and_uneven_weights_are_refused():
    from zoft.callback import _ExampleMeanLogProbs

    log_probs = -torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    lp = (log_probs * mask).requires_grad_()
    # SFTTrainer's nll: a token sum over the batch divided by a batch-wide count (here 8 tokens)
    (-_ExampleMeanLogProbs.apply(lp, mask)).sum().div(8).backward()
    # what FlashDP clips: the gradient of sum_i mean_t(-log p) over each example's own label tokens
    ref = (log_probs * mask).requires_grad_()
    (-(ref * mask).sum(1) / mask.sum(1)).sum().backward()
    torch.testing.assert_close(lp.grad, ref.grad)

    weighted = (log_probs * mask).requires_grad_()
    dft = -(_ExampleMeanLogProbs.apply(weighted, mask) * weighted.exp().detach()).sum() / 8  # TRL's loss_type dft
    with pytest.raises(ZoftError, match=r"weights the tokens' log-probabilities unevenly .*loss_type='nll'"):
        dft.backward()
