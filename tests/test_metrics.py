"""zoft's metrics in HF's logs and in TensorBoard: tokens/s, peak memory, epsilon, projected gradients."""

import time
from pathlib import Path

import pytest
import torch
from conftest import peak_rss_mib, tiny_recipe
from transformers import TrainerCallback

from zoft import run
from zoft.callback import ZoftCallback
from zoft.config import validate_recipe
from zoft.data.collate import CausalLMCollator
from zoft.errors import ZoftError
from zoft.metrics import count_tokens
from zoft.privacy import epsilon_spent

torch.set_num_threads(2)

SLEEP = 0.25  # per collated batch: makes each logging window long enough to time


def _rows(n=32):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 1000, (4 if i % 2 else 24,), generator=g).tolist()  # much padding in each batch
        rows.append({"input_ids": ids, "labels": ids})
    return rows


class RecordingCollator:
    """Collates, remembers each batch's non-padding token count, and sleeps."""

    def __init__(self, sleep=0.0):
        self.collate = CausalLMCollator(pad_token_id=0)
        self.sleep = sleep
        self.tokens = []

    def __call__(self, rows):
        batch = self.collate(rows)
        self.tokens.append(int(batch["attention_mask"].sum()))
        time.sleep(self.sleep)
        return batch


class LogTimes(TrainerCallback):
    """When training began and when each training log was made, as seen by a later callback."""

    def __init__(self):
        self.begin, self.logs = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append(time.perf_counter())


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                report_to="none", disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=False,
                learning_rate=1e-3, seed=0)
    return TrainingArguments(**{**base, **kw})


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))




def _events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(out.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {out}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return acc


def test_count_tokens_counts_non_padding_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": mask}) == 4
    assert count_tokens({"input_ids": torch.zeros(2, 4)}) == 8
    assert count_tokens({"zo": {"input_ids": torch.zeros(1, 3), "attention_mask": torch.ones(1, 3)}, "fo": None}) == 3


@pytest.mark.parametrize("path", ["callback", "zoft_trainer_mezo"])
def test_tokens_per_second_and_peak_memory_are_the_measured_ones(path, tiny_llama_dir, tmp_path):
    from transformers import Trainer

    from zoft import MeZOConfig, ZoftTrainer

    spike = torch.ones(64 * 2**20)  # 256 MiB touched and freed: the process high-water mark is above it now
    del spike
    peak_before = peak_rss_mib()
    collator, times = RecordingCollator(sleep=SLEEP), LogTimes()
    common = dict(model=_lora_model(tiny_llama_dir), train_dataset=_rows(), data_collator=collator)
    if path == "callback":
        trainer = Trainer(args=_args(tmp_path), callbacks=[ZoftCallback(), times], **common)
    else:
        trainer = ZoftTrainer(args=_args(tmp_path, max_grad_norm=0.0), zo=MeZOConfig(), callbacks=[times], **common)
    trainer.train()
    peak_after = peak_rss_mib()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and len(times.logs) == 3
    starts = [times.begin] + times.logs[:-1]
    for k, entry in enumerate(logs):
        # The k-th window trained the k-th batch (one per step); its wall time is that between two logs.
        seconds = times.logs[k] - starts[k]
        assert seconds > SLEEP * 0.9  # the window includes a (sleeping) batch collation
        implied = collator.tokens[k] / entry["tokens_per_second"]
        assert implied == pytest.approx(seconds, rel=0.05, abs=0.03), (k, implied, seconds)  # padding: +70%
    peaks = [h["peak_memory_mb"] for h in logs]
    assert peak_before <= peaks[0] and peaks == sorted(peaks) and peaks[-1] <= peak_after


def test_zoft_trainer_run_writes_zoft_metrics_to_tensorboard(tiny_llama_dir, sentiment_csv, tmp_path):
    pytest.importorskip("tensorboard")
    recipe = validate_recipe(tiny_recipe(
        tiny_llama_dir, sentiment_csv, tmp_path / "run",
        train={"max_steps": 2, "logging_steps": 1, "save_strategy": "no", "report_to": "tensorboard"},
    ))
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer.train()
    acc = _events(tmp_path / "run")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("loss", "zo_projected_grad", "zo_loss_plus", "tokens_per_second", "peak_memory_mb"):
        scalars = acc.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [1, 2], key
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in logs], rel=1e-6), key


def test_callback_run_writes_epsilon_and_no_gradient_norm_to_tensorboard(tiny_llama_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from transformers import Trainer

    callback = ZoftCallback(privacy={"noise_multiplier": 1.0, "clip_bound": 1.0, "sampling": "shuffle"})
    args = _args(tmp_path, max_steps=2, logging_steps=2, report_to="tensorboard", max_grad_norm=0.0,
                 dataloader_drop_last=True)
    trainer = Trainer(model=_lora_model(tiny_llama_dir), args=args, train_dataset=_rows(),
                      data_collator=RecordingCollator(), callbacks=[callback])
    trainer.train()
    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_second", "train/peak_memory_mb", "train/dp_epsilon"} <= tags
    assert not any("grad_norm" in t for t in tags)  # the pre-noise norm never reaches a logger
    expected = epsilon_spent(4 / 32, 1.0, 2, 1 / 32**1.1)  # q = 4 of N = 32 rows, 2 steps, default delta
    assert [s.value for s in acc.Scalars("train/dp_epsilon")] == pytest.approx([expected] * 2, rel=1e-6)
    assert callback.privacy_report()["epsilon"] == pytest.approx(expected, rel=1e-12)


def test_report_to_a_missing_logger_is_one_line(tiny_llama_dir, sentiment_csv, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, train={"report_to": ["wandb"]}))
    with pytest.raises(ZoftError) as info:
        run.training_arguments(recipe)
    assert str(info.value) == "train.report_to 'wandb': the wandb package is not installed; pip install wandb, or drop it"
