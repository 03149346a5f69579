"""Client matrix: zoft.ZoftCallback in trl.SFTTrainer (its default SFTConfig) and in a plain transformers.Trainer.

One row per method and client; each checks the property the method promises, not only that training ran:

- WTA-CRS: the replaced layers keep about ``ratio`` of their inputs for the backward (the layers' own counters),
  and those counters are what autograd really saves (``saved_tensors_hooks``, plain Trainer: without gradient
  checkpointing the hooks see every saved tensor); under TRL's default gradient checkpointing it trains at all
  (issue 22: the recomputed forward used to draw another sample and raise CheckpointError).
- LoRA-Pro: the adapter gradients the optimizer steps on are LoRA-Pro's for that step's (clipped) gradients:
  against zoft's function and against a float64 least-squares solve of the paper's problem.
- Metrics: ``tokens_per_second`` times each logging window is the number of non-padding tokens the client itself
  counted in that window (TRL's ``num_tokens``, HF's ``num_input_tokens_seen``); ``peak_memory_mb`` is the
  process high-water mark.

FlashDP's row (privacy through the callback on TRL) is in its own test file, written with the FlashDP-on-TRL fix.
The doc page's TRL example (docs/callback.md, "with TRL") is run here too, on the tiny model.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import peak_rss_mib
from datasets import Dataset
from torch.autograd.graph import saved_tensors_hooks
from transformers import TrainerCallback, set_seed

from zoft.callback import ZoftCallback
from zoft.lora.pro import lora_pro_step
from zoft.memory.wta_crs import WTACRSLinear

trl = pytest.importorskip("trl")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj"]
RATIO = 0.3
# Short reviews of different lengths: every batch of 8 has padding.
TEXTS = [f"Review {i}: " + " ".join(["a warm, funny and moving film"] * (1 + i % 5)) for i in range(24)]
CLIENTS = ["sft", "trainer"]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM")


def _sft(model_dir, out, callbacks, texts=TEXTS, **config):
    """trl.SFTTrainer with SFTConfig's defaults; only what docs/callback.md says to set on a CPU machine."""
    from trl import SFTConfig, SFTTrainer

    set_seed(0)
    args = SFTConfig(**{"output_dir": str(out), "use_cpu": True, "max_steps": 2, **config})
    return SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                      peft_config=_lora_config(), callbacks=callbacks)


def _trainer(model_dir, out, callbacks, **config):
    """A user's plain transformers.Trainer script: peft LoRA model, tokenized text, HF's LM collator."""
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    set_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), _lora_config())
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"] + tok.eos_token), remove_columns=["text"])
    args = TrainingArguments(**{"output_dir": str(out), "max_steps": 2, "report_to": "none", "disable_tqdm": True,
                                **config})
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def _client(name, model_dir, out, callbacks, **config):
    return (_sft if name == "sft" else _trainer)(model_dir, out, callbacks, **config)


def _training_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------- WTA-CRS


class WTACounters(TrainerCallback):
    """The replaced layers' counters after each step (they are put back at train end)."""

    def __init__(self):
        self.steps, self.sharing = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, WTACRSLinear)]
        self.steps.append((sum(m.bytes_in for m in layers), sum(m.bytes_kept for m in layers), len(layers)))
        self.sharing.append([m.bytes_in > 0 for m in layers])


class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd keeps during each training forward of ``model``."""

    def __init__(self, model):
        self.per_forward: list[int] = []
        self._ctx = None
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        def pre(module, args, kwargs):
            if module.training and torch.is_grad_enabled():
                storages.clear()
                self._ctx = saved_tensors_hooks(pack, lambda t: t)
                self._ctx.__enter__()

        def post(module, args, kwargs, out):
            if self._ctx is not None:
                self._ctx.__exit__(None, None, None)
                self._ctx = None
                self.per_forward.append(sum(storages.values()))

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post, with_kwargs=True)


def _kept_fraction_bound(bytes_in, samples, elem=4, features=32):
    """The largest bytes_kept / bytes_in: ceil(ratio * n) of n rows, each with an int64 index and a float32 weight."""
    n = bytes_in / samples / (elem * features)  # tokens per sample (every sample here is of one batch)
    return math.ceil(RATIO * n) / n * (1 + 12 / (elem * features))


class AdapterGrads(TrainerCallback):
    """The lora_A gradients the optimizer is about to use, per step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n})


def test_wta_crs_with_sft_defaults_trains_under_gradient_checkpointing_and_keeps_ratio_of_the_inputs(
    tiny_llama_dir, tmp_path
):
    # Regression (issue 22): SFTConfig turns gradient checkpointing on; the recomputed forward drew another sample
    # and the first backward raised torch.utils.checkpoint.CheckpointError.
    runs = {}
    for checkpointing in (True, False):
        counters, grads = WTACounters(), AdapterGrads()
        callback = ZoftCallback(wta_crs={"ratio": RATIO, "target_modules": TARGETS})
        config = {} if checkpointing else {"gradient_checkpointing": False}
        trainer = _sft(tiny_llama_dir, tmp_path / str(checkpointing), [callback, counters, grads], **config)
        trainer.train()
        runs[checkpointing] = (trainer, callback, counters, grads)
    trainer, callback, counters, grads = runs[True]
    assert trainer.args.gradient_checkpointing and trainer.args.bf16  # the defaults this row is about
    assert trainer.model.is_gradient_checkpointing
    assert "WTA-CRS (ratio 0.3, 4 layers)" in callback.describe()  # lora_A of q and v, 2 layers
    for bytes_in, bytes_kept, layers in counters.steps:
        assert layers == 4 and bytes_in > 0
        # 2 samples (q/v of 2 layers) per forward; the checkpointed segments are also recomputed: 4 per step
        assert 0 < bytes_kept / bytes_in <= _kept_fraction_bound(bytes_in, samples=4)
    # q and v's lora_A read one tensor: one sample per layer, in the forward and in its recomputation alike.
    assert counters.sharing[-1] == [True, False, True, False]
    # The recomputation drew the forward's rows: the same (sampled) gradients as without checkpointing. Step 1
    # has B = 0, so lora_A's gradient is 0; step 2's is the sampled estimate.
    plain_grads = runs[False][3].steps
    assert len(grads.steps) == len(plain_grads) == 2 and any(g.abs().sum() > 0 for g in grads.steps[1].values())
    for with_ckpt, without in zip(grads.steps, plain_grads):
        for name in with_ckpt:
            torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-5, atol=1e-8, msg=name)
    assert not any(isinstance(m, WTACRSLinear) for m in trainer.model.modules())  # given back


def test_wta_crs_in_a_plain_trainer_saves_what_its_counters_say(tiny_llama_dir, tmp_path):
    # The same script with and without the callback: the same first batch, so the saved bytes differ by exactly
    # what the replaced layers report (the input they no longer keep, minus the rows, indices and weights kept).
    runs = {}
    for name, callbacks in (("plain", []), ("wta", [ZoftCallback(wta_crs={"ratio": RATIO, "target_modules": TARGETS})])):
        counters = WTACounters()
        trainer = _trainer(tiny_llama_dir, tmp_path / name, callbacks + [counters], max_steps=1)
        saved = SavedBytes(trainer.model)
        trainer.train()
        runs[name] = (saved.per_forward, counters.steps)
    (plain_bytes, _), (wta_bytes, wta_steps) = runs["plain"], runs["wta"]
    bytes_in, bytes_kept, layers = wta_steps[0]
    assert layers == 4 and len(plain_bytes) == len(wta_bytes) == 1
    assert plain_bytes[0] - wta_bytes[0] == bytes_in - bytes_kept > 0
    assert bytes_kept / bytes_in <= _kept_fraction_bound(bytes_in, samples=2)


def test_wta_crs_grad_norm_cache_through_the_callback_hits_from_the_second_epoch(tiny_llama_dir, tmp_path):
    # 16 rows, 8 per step: epoch 1 is steps 1-2, epoch 2 steps 3-4, in another (shuffled) order. Examples are
    # recognised by their tokens, so every lookup of epoch 1 misses and every lookup of epoch 2 hits.
    callback = ZoftCallback(wta_crs={"ratio": RATIO, "target_modules": TARGETS, "grad_norm_cache": True})
    trainer = _sft(tiny_llama_dir, tmp_path, [callback], texts=TEXTS[:16], max_steps=4)
    trainer.train()
    cache, groups = callback.grad_norm_cache, 2  # q and v's lora_A share one sample per layer
    assert "gradient-aware" in callback.describe()
    # each step: a lookup in the forward and one in the checkpointed recomputation, per group
    assert (cache.misses, cache.hits) == (2 * groups * 2, 2 * groups * 2)
    assert len(cache) == 16 * groups


# ---------------------------------------------------------------- LoRA-Pro


class LoraProCapture(TrainerCallback):
    """Per step: each adapter's A, B and (clipped) LoRA gradients before the step, and A, B after it."""

    def __init__(self, model, max_grad_norm):
        from peft.tuners.lora.layer import LoraLayer

        self.max_grad_norm = max_grad_norm
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.raw: dict[int, torch.Tensor] = {}
        self.before: dict[int, torch.Tensor] = {}
        self.steps = []
        for p in self.trainable:
            p.register_post_accumulate_grad_hook(self._keep)

    def _keep(self, p):
        self.raw[id(p)] = p.grad.detach().clone()
        self.before[id(p)] = p.detach().clone()  # the weights do not move between the backward and the step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # ZoftCallback runs first (it puts itself at the front): the LoRA pairs have taken their step here.
        total = torch.linalg.vector_norm(torch.stack([self.raw[id(p)].norm() for p in self.trainable]))
        clip = min(1.0, self.max_grad_norm / (float(total) + 1e-6))  # torch.nn.utils.clip_grad_norm_
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        step = {}
        for name, layer in self.layers.items():
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            g = groups[id(A)]
            step[name] = dict(A=self.before[id(A)], B=self.before[id(B)], s=float(layer.scaling["default"]),
                              raw_A=self.raw[id(A)] * clip, raw_B=self.raw[id(B)] * clip,
                              new_A=A.detach().clone(), new_B=B.detach().clone(), grads_left=(A.grad, B.grad),
                              lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"], wd=g["weight_decay"])
        self.steps.append(step)


@pytest.mark.parametrize("client", CLIENTS)
def test_lora_pro_steps_each_adapter_by_the_papers_algorithm(client, tiny_llama_dir, tmp_path):
    trainer = _client(client, tiny_llama_dir, tmp_path, [ZoftCallback(lora_pro=True)])
    capture = LoraProCapture(trainer.model, trainer.args.max_grad_norm)
    trainer.add_callback(capture)
    trainer.train()
    assert len(capture.steps) == 2 and len(capture.steps[0]) == 4  # 2 steps; q and v in 2 layers
    states = {name: {} for name in capture.steps[0]}  # the reference's own Adam moments per adapter
    for k, step in enumerate(capture.steps):
        for name, c in step.items():
            # The recipe path's step (zoft.lora.pro.lora_pro_step, Algorithm 1) on the same clipped gradients
            # with the Trainer's lr, betas, eps and weight decay.
            A, B = c["A"].clone(), c["B"].clone()
            lora_pro_step(A, B, c["raw_A"], c["raw_B"], c["s"], states[name], lr=c["lr"], betas=c["betas"],
                          eps=c["eps"], weight_decay=c["wd"])
            torch.testing.assert_close(c["new_A"], A, rtol=1e-5, atol=1e-7, msg=f"step {k} {name}")
            torch.testing.assert_close(c["new_B"], B, rtol=1e-5, atol=1e-7, msg=f"step {k} {name}")
            assert c["grads_left"] == (None, None)  # the Trainer's optimizer does not step the pair again
            assert not torch.equal(c["new_B"], c["B"])  # the step moved the adapter
        if k == 0:  # LoRA's first step (B = 0): A gets no gradient, so it does not move
            assert all(torch.equal(c["new_A"], c["A"]) for c in step.values())


# ---------------------------------------------------------------- metrics


class Timeline(TrainerCallback):
    """Makes every step last >= 0.3 s (so clock offsets of a few ms do not matter) and notes the log times."""

    def __init__(self):
        self.begin, self.logs = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(0.3)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append(time.perf_counter())




@pytest.mark.parametrize("client", CLIENTS)
def test_metrics_tokens_per_second_match_the_clients_own_token_count(client, tiny_llama_dir, tmp_path):
    timeline = Timeline()
    # logging_steps: TRL's default is 10 (docs/callback.md says to lower it for short runs); the Trainer counts
    # non-padding tokens itself when asked.
    extra = {} if client == "sft" else {"include_num_input_tokens_seen": "non_padding"}
    trainer = _client(client, tiny_llama_dir, tmp_path, [ZoftCallback(), timeline], logging_steps=1, **extra)
    peak_before = peak_rss_mib()
    trainer.train()
    peak_after = peak_rss_mib()
    logs = _training_logs(trainer)
    assert len(logs) == 2 == len(timeline.logs)
    count = "num_tokens" if client == "sft" else "num_input_tokens_seen"
    seen = [0] + [h[count] for h in logs]
    starts = [timeline.begin] + timeline.logs[:-1]
    for k, entry in enumerate(logs):
        tokens = seen[k + 1] - seen[k]
        assert 0 < tokens < 8 * max(len(t) for t in TEXTS)  # non-padding tokens of one batch of 8
        seconds = timeline.logs[k] - starts[k]
        assert entry["tokens_per_second"] * seconds == pytest.approx(tokens, rel=0.03), (k, entry)
    peaks = [h["peak_memory_mb"] for h in logs]
    assert peak_before <= peaks[0] and peaks == sorted(peaks) and peaks[-1] <= peak_after


# ---------------------------------------------------------------- the doc page's TRL example


def _doc_example() -> str:
    page = (REPO / "docs" / "callback.md").read_text()
    section = page[page.index("## With TRL") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_trl_example_in_docs_runs(tiny_llama_dir, tmp_path, monkeypatch):
    code = _doc_example()
    # The page trains the packaged SmolLM2-135M; here the tiny model with the same tokenizer, in a temp folder.
    assert 'model_asset_path("smollm2-135m")' in code and 'output_dir="runs/sft-zoft"' in code
    code = code.replace('model_asset_path("smollm2-135m")', repr(tiny_llama_dir))
    assert "max_steps=4," in code
    code = code.replace("max_steps=4,", "max_steps=2,")  # faster; the page's 4 were run on SmolLM2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/callback.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps
    logs = _training_logs(trainer)
    assert logs and all({"tokens_per_second", "peak_memory_mb"} <= set(h) for h in logs)
    assert trainer.args.gradient_checkpointing  # the example keeps TRL's default
