"""MeZO through ZoftTrainer and the recipe path: accumulation, resume, replay, the trajectory."""

import json

import pytest
import torch
from conftest import tiny_recipe, train_recipe, train_until_killed
from safetensors.torch import load_file

from zoft import checkpoints, run
from zoft.config import validate_recipe
from zoft.zo.trajectory import read_trajectory


def _weights(folder):
    import glob

    files = glob.glob(f"{folder}/*.safetensors")
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _trained_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_of_k_microbatches_with_one_seed_equals_one_big_batch(
    tiny_llama_dir, sentiment_csv, tmp_path
):
    big = train_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "big",
                             train={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                    "save_strategy": "no"}))
    small = train_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "acc",
                               train={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                                      "save_strategy": "no"}))
    a, b = _trained_state(big), _trained_state(small)
    start = _trained_state(run.build_trainer(validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "s"))))
    moved = max((a[n] - start[n]).abs().max().item() for n in a)
    assert moved > 1e-4  # the runs did train
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-3 * moved), n
    ga, gb = read_trajectory(tmp_path / "big" / "trajectory.jsonl")[1], read_trajectory(tmp_path / "acc" / "trajectory.jsonl")[1]
    for ra, rb in zip(ga, gb):
        assert ra["coefficients"][0][1] == pytest.approx(rb["coefficients"][0][1], rel=2e-3, abs=1e-5)  # padding widths differ


@pytest.mark.parametrize("peft,dtype", [(None, "float32"), ({"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                                            "float32"), (None, "bfloat16")])
def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_run_and_replay_rebuilds_them(
    tiny_llama_dir, sentiment_csv, tmp_path, peft, dtype
):
    # bf16: no fp32 copies, each update rounded stochastically with seeded bits; resume and replay stay exact.
    settings = {"train": {"max_steps": 6, "save_steps": 2}, "peft": peft, "model": {"dtype": dtype}}
    straight = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "straight", **settings))
    run.train(straight)

    killed = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "killed", **settings))
    trainer = train_until_killed(killed, 5)  # after checkpoint-4, before step 6
    del trainer
    assert checkpoints.latest_complete_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    resumed = killed.model_copy(update={"output": killed.output.model_copy(update={"resume": True})})
    run.train(resumed)

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    header, _ = read_trajectory(tmp_path / "straight" / "trajectory.jsonl")
    if dtype == "bfloat16":
        assert header["master_weights"] == [] and a["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
        assert {tuple(v) for v in header["rounding"].values()} == {("bfloat16", "stochastic")}
        base = _weights(tiny_llama_dir)
        changed = sum((a[k] != base[k].to(torch.bfloat16)).sum().item() for k in a)
        assert changed > 0.5 * sum(t.numel() for t in a.values())  # the bf16 weights did train
    # The trajectory of the resumed run has each step once, as the straight run's.
    _, recs_a = read_trajectory(tmp_path / "straight" / "trajectory.jsonl")
    _, recs_b = read_trajectory(tmp_path / "killed" / "trajectory.jsonl")
    assert [r["step"] for r in recs_b] == list(range(6))
    assert recs_a == recs_b

    # Replay: base model + trajectory -> the same weights, bit for bit.
    rebuilt = tmp_path / "rebuilt"
    assert run.replay(str(tmp_path / "straight"), str(rebuilt)) == 6
    c = _weights(rebuilt)
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_trajectory_records_step_seed_inputs_projected_gradient_and_lr(tiny_llama_dir, sentiment_csv, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "r",
                         method={"n_directions": 2}, train={"save_strategy": "no", "lr_scheduler_type": "linear"})
    trainer = train_recipe(recipe)
    header, records = read_trajectory(tmp_path / "r" / "trajectory.jsonl")
    assert header["run_seed"] == 7 and header["distribution"] == "gaussian" and header["n_directions"] == 2
    assert set(header["trained"]) == set(trainer.zo_params.params)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True)  # the linear schedule
    for r in records:
        assert [k for k, _ in r["coefficients"]] == [0, 1]
        for (_, c), lp, lm in zip(r["coefficients"], r["loss_plus"], r["loss_minus"]):
            # coefficient = projected gradient / n_directions, projected gradient = (L+ - L-) / 2eps
            assert c == pytest.approx((lp - lm) / (2 * 1e-3) / 2, rel=1e-9, abs=1e-12)
    logged = [h for h in trainer.state.log_history if "zo_projected_grad" in h]
    assert logged and all("zo_loss_plus" in h and "zo_loss_minus" in h for h in logged)


def test_a_checkpoint_without_its_completion_marker_is_never_resumed(tiny_llama_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    run.train(validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, out, train={"max_steps": 4, "save_steps": 2})))
    assert [s for s, _, ok in checkpoints.checkpoints(out) if ok] == [2, 4]
    (out / "checkpoint-4" / checkpoints.MARKER).unlink()  # as if killed during the save of step 4
    assert checkpoints.latest_complete_checkpoint(out).name == "checkpoint-2"
    marker = json.loads((out / "checkpoint-2" / checkpoints.MARKER).read_text())
    assert marker == {"global_step": 2}
