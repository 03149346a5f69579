"""End to end through the `zoft` command: the quickstart recipe on a tiny model, refusals, replay."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def zoft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zoft", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd or REPO, timeout=900)


def _quickstart_on(model, data, out, *extra):
    return zoft("train", "configs/quickstart.yaml", f"model.name={model}", f"data.train={data}",
                f"output.dir={out}", "train.max_steps=4", "train.save_steps=2", "train.logging_steps=2",
                "data.max_eval_samples=16", "train.per_device_train_batch_size=4", *extra)


def test_quickstart_recipe_on_a_tiny_model_trains_evaluates_saves_and_loads_without_zoft(
    tiny_llama_dir, sentiment_csv, tmp_path
):
    out = tmp_path / "run"
    proc = _quickstart_on(tiny_llama_dir, sentiment_csv, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zoft: before training: accuracy" in proc.stdout and "zoft: after training:  accuracy" in proc.stdout
    assert "4/4" in proc.stderr  # HF's progress bar reached the end
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert 0.0 <= metrics[when]["eval_accuracy"] <= 1.0 and metrics[when]["eval_loss"] > 0
    assert metrics["train"]["train_loss"] > 0
    assert (out / "model.safetensors").is_file() and (out / "trajectory.jsonl").is_file()

    # The saved model loads with plain transformers, zoft not imported, matches the weights zoft saved
    # in its last checkpoint (the run ended at step 4) and differs from the untrained model.
    check = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
ckpt = AutoModelForCausalLM.from_pretrained({str(out / 'checkpoint-4')!r}).eval()
base = AutoModelForCausalLM.from_pretrained({tiny_llama_dir!r}).eval()
ids = torch.tensor([[1, 2, 3, 4, 5]])
with torch.no_grad():
    assert torch.equal(model(ids).logits, ckpt(ids).logits)
    assert not torch.equal(model(ids).logits, base(ids).logits)
assert "zoft" not in sys.modules
print("LOADED")
"""
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert "LOADED" in proc.stdout, proc.stderr[-2000:]

    # Running again into the same folder is refused with the fix, and nothing is lost.
    before = sorted(p.name for p in out.iterdir())
    proc = _quickstart_on(tiny_llama_dir, sentiment_csv, out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"zoft: error: output.dir: {out} already exists and is not empty (it has checkpoint-4); continue it "
        "with output.resume=true, replace it with output.overwrite=true, or choose another output.dir"
    )
    assert sorted(p.name for p in out.iterdir()) == before

    # replay through the command line rebuilds the weights exactly.
    proc = zoft("replay", str(out), "--out", str(tmp_path / "rebuilt"))
    assert proc.returncode == 0 and "replayed 4 steps" in proc.stdout, proc.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(out / "model.safetensors")
    b = load_file(tmp_path / "rebuilt" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_model_folder_and_missing_data_file_are_one_line_errors(tiny_llama_dir, sentiment_csv, tmp_path):
    proc = _quickstart_on(str(tmp_path / "no-model"), sentiment_csv, tmp_path / "a")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"zoft: error: model.name: folder {tmp_path / 'no-model'} not found"
    proc = _quickstart_on(tiny_llama_dir, str(tmp_path / "none.csv"), tmp_path / "b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"zoft: error: data.train: file {tmp_path / 'none.csv'} not found"
    proc = zoft("replay", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and f"{tmp_path}: not a zoft run folder (no recipe.yaml)" in proc.stderr


@pytest.mark.slow
def test_quickstart_on_the_real_model_scores_like_plain_transformers(tmp_path):
    """The packaged SmolLM2 + Rotten Tomatoes: zoft's 'before' accuracy equals a plain HF computation."""
    out = tmp_path / "real"
    proc = zoft("train", "configs/quickstart.yaml", f"output.dir={out}", "train.max_steps=1",
                "data.max_train_samples=32", "data.max_eval_samples=24", "train.per_device_train_batch_size=4",
                "train.save_strategy=no")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoft import assets

    path = assets.model_asset_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = assets.load_data_asset("rotten-tomatoes").train_test_split(test_size=0.1, seed=0)["test"]
    rows = rows.select(range(24))
    assert isinstance(rows, datasets.Dataset)
    great, terrible = tok(" great")["input_ids"][0], tok(" terrible")["input_ids"][0]
    correct = 0
    with torch.no_grad():
        for row in rows:
            prompt = f"Review: {row['text']}\nSentiment (great or terrible):"
            logits = model(torch.tensor([tok(prompt)["input_ids"][-96:]])).logits[0, -1]
            pred = "fresh" if logits[great] > logits[terrible] else "rotten"
            correct += pred == row["label"]
    assert metrics["before"]["eval_accuracy"] == pytest.approx(correct / 24)
