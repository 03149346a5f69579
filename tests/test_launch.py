"""`zoft train` as one rank of a launch: torchrun, accelerate launch, DeepSpeed ZeRO; gloo, 2 CPU processes.

The references are single-process runs with twice the per-device batch: with DDP (and ZeRO, which
averages gradients the same way) two ranks of batch 4 see the same 8 examples per step as one
process of batch 8, so the final adapters must agree to float rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_reviews_csv
from safetensors.torch import load_file

from zoft import launch, run
from zoft.cli import main
from zoft.config import load_recipe, validate_recipe
from zoft.errors import RecipeError, ZoftError

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
for _var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)
PORT = str(29000 + os.getpid() % 400)  # below test_distributed.py's 29500 + pid % 1000
needs_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install 'zoft[deepspeed]')"
)


def _reviews(path):
    return write_reviews_csv(path)


def _recipe(model_dir, data, out, method="adamw", batch=4, **train):
    return {
        "model": {"name": model_dir},
        "data": {"train": data, "format": "classification", "template": "Review: {text}\nSentiment:",
                 "verbalizers": {"fresh": " great", "rotten": " terrible"}, "test_size": 0.2, "max_length": 32},
        "method": {"name": method, "eps": 1e-2} if method == "mezo" else {"name": method},
        "peft": {"method": "lora", "r": 4},
        "train": {"learning_rate": 1e-2, "max_steps": 4, "per_device_train_batch_size": batch,
                  "per_device_eval_batch_size": 8, "logging_steps": 2, "save_strategy": "no", "seed": 7,
                  "disable_tqdm": True, **train},
        "output": {"dir": str(out)},
        "evaluation": {"before": method != "mezo", "after": method != "mezo"},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("launch")
    data = _reviews(root / "reviews.csv")

    def recipe_file(name, **kw):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, data, root / name, **kw)))
        return path

    return root, recipe_file


def _single_process(setup, name, **kw):
    """The reference: one process, per-device batch 8, in this process."""
    root, recipe_file = setup
    metrics = run.train(load_recipe(recipe_file(name, batch=8, **kw)))
    return metrics, load_file(root / name / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def adamw_reference(setup):
    return _single_process(setup, "adamw-one")


def _launch(launcher, recipe, *overrides, timeout=300):
    return subprocess.run([*launcher, "-m", "zoft", "train", str(recipe), *overrides], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", PORT]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", PORT]


def _assert_same_adapter(reference, out, tol=1e-6):
    got = load_file(Path(out) / "adapter_model.safetensors")
    assert got.keys() == reference.keys()
    assert max(t.abs().max().item() for k, t in reference.items() if "lora_B" in k) > 1e-3  # it trained
    for k, t in reference.items():
        assert torch.allclose(got[k], t, atol=tol, rtol=0), (k, (got[k] - t).abs().max().item())


def _assert_same_metrics(reference, out):
    got = json.loads((Path(out) / "metrics.json").read_text())
    for when in ("before", "after"):
        assert got[when]["eval_accuracy"] == reference[when]["eval_accuracy"]
        assert got[when]["eval_loss"] == pytest.approx(reference[when]["eval_loss"], abs=1e-5)
    assert got["train"]["train_loss"] == pytest.approx(reference["train"]["train_loss"], abs=1e-5)


def test_torchrun_ddp_equals_one_process_with_twice_the_batch_and_rank0_alone_reports(setup, adamw_reference):
    root, recipe_file = setup
    metrics, adapter = adamw_reference
    recipe = recipe_file("adamw-torchrun")
    proc = _launch(TORCHRUN, recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_adapter(adapter, root / "adamw-torchrun")
    _assert_same_metrics(metrics, root / "adamw-torchrun")
    # Each rank is one process of a 2-process launch (no re-launch), and only rank 0 speaks.
    assert proc.stdout.count("zoft: adamw on") == 1 and "; 2 processes" in proc.stdout
    assert proc.stdout.count("zoft: saved to") == 1
    assert json.loads((root / "adamw-torchrun" / "metrics.json").read_text())["train"]["epoch"] == 0.5  # 4 x 8 of 64

    # Again into the same folder: refused once (rank 0 decides for all ranks), nothing touched.
    before = {p.name: p.stat().st_mtime_ns for p in (root / "adamw-torchrun").iterdir()}
    proc = _launch(TORCHRUN, recipe)
    assert proc.returncode != 0
    assert proc.stderr.count("zoft: error: output.dir:") == 1, proc.stderr[-3000:]
    assert f"zoft: error: output.dir: {root / 'adamw-torchrun'} already exists and is not empty; continue it" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (root / "adamw-torchrun").iterdir()} == before


def test_accelerate_launch_with_the_cpu_preset_is_the_same_ddp_run(setup, adamw_reference):
    root, recipe_file = setup
    metrics, adapter = adamw_reference
    proc = _launch(ACCELERATE, recipe_file("adamw-accelerate"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("zoft: adamw on") == 1 and "; 2 processes" in proc.stdout
    _assert_same_adapter(adapter, root / "adamw-accelerate")
    _assert_same_metrics(metrics, root / "adamw-accelerate")


@pytest.fixture(scope="module")
def mezo_reference(setup):
    root, _ = setup
    _, adapter = _single_process(setup, "mezo-one", method="mezo")
    from zoft.zo.trajectory import read_trajectory

    return adapter, read_trajectory(root / "mezo-one" / "trajectory.jsonl")[1]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_mezo_under_a_launcher_trains_with_distzo2_data_parallelism(setup, mezo_reference, launcher):
    root, recipe_file = setup
    adapter, one = mezo_reference
    name = f"mezo-{launcher}"
    proc = _launch(TORCHRUN if launcher == "torchrun" else ACCELERATE, recipe_file(name, method="mezo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("zoft: 2 processes: zeroth-order data parallelism (DistZO2") == 1
    from zoft.zo.trajectory import read_trajectory

    two = read_trajectory(root / name / "trajectory.jsonl")[1]
    assert [r["step"] for r in two] == [0, 1, 2, 3]
    # The mean of two half-batch losses is the full-batch loss up to fp32 rounding (~6e-8), so the
    # projected gradient (L+ - L-) / 2eps, 2eps = 0.02, agrees to ~1e-5; plain DDP would not run
    # ZO at all, and ranks without DistZO2 would each use their own half batch (g off by ~1e-1).
    dg = [abs(a["coefficients"][0][1] - b["coefficients"][0][1]) for a, b in zip(one, two)]
    assert max(dg) < 1e-4, dg
    recorded = yaml.safe_load((root / name / "recipe.yaml").read_text())
    assert recorded["distributed"]["perturbation_parallel"] == 1  # the resolved recipe says what ran
    _assert_same_adapter(adapter, root / name, tol=1e-2 * sum(dg) * 6 + 1e-7)  # lr * sum|dg| * |z|


@needs_deepspeed
def test_deepspeed_zero2_under_torchrun_equals_ddp(setup, adamw_reference):
    root, recipe_file = setup
    metrics, adapter = adamw_reference
    recipe = recipe_file("adamw-zero2", deepspeed=str(REPO / "configs/deepspeed/zero2.json"))
    proc = _launch(TORCHRUN, recipe, timeout=540)  # DeepSpeed compiles a CPU op on first use (~1-2 min)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The evaluation before training runs inside train() (HF cannot evaluate before it under ZeRO-1/2).
    _assert_same_metrics(metrics, root / "adamw-zero2")
    _assert_same_adapter(adapter, root / "adamw-zero2")


def test_outside_a_launcher_a_multi_process_recipe_says_how_to_launch_it(setup, capsys):
    root, recipe_file = setup
    path = recipe_file("pertp", method="mezo")
    data = yaml.safe_load(path.read_text())
    data["distributed"] = {"perturbation_parallel": 2}
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == (
        "zoft: error: distributed: this recipe runs on 2 processes (perturbation_parallel 2 x data_parallel 1) and "
        f"zoft was started as one; start it with a launcher: torchrun --nproc_per_node 2 -m zoft train {path} "
        "(or accelerate launch --num_processes 2 -m zoft train ...)\n"
    )
    assert not (root / "pertp").exists()  # refused before anything ran


def test_fit_recipe_to_launch(setup):
    _, recipe_file = setup
    two = {"WORLD_SIZE": "2"}
    mezo = load_recipe(recipe_file("fit", method="mezo"))
    assert launch.fit_recipe_to_launch(mezo, {}) is mezo  # one process: as written
    fitted = launch.fit_recipe_to_launch(mezo, two)
    assert fitted.distributed is not None and fitted.distributed.perturbation_parallel == 1
    assert fitted.distributed.data_parallel is None  # = world size at run time
    adamw = load_recipe(recipe_file("fit"))
    assert launch.fit_recipe_to_launch(adamw, two) is adamw  # DDP / DeepSpeed: HF's job
    qzo = load_recipe(recipe_file("fit", method="mezo"), ["method.name=qzo", "peft=null",
                                                            "model.quantization=nf4"])
    with pytest.raises(launch.SharedError, match=r"^method 'qzo' runs in one process in this version, but 2 were "
                                                 r"launched; run it without a launcher, or use method mezo"):
        launch.fit_recipe_to_launch(qzo, two)


def test_single_process_env_gives_deepspeed_rank_0_of_1_and_keeps_a_launchers_values():
    env = {}
    launch.single_process_env(env)
    assert {k: env[k] for k in ("MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE")} == {
        "MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    launched = {"WORLD_SIZE": "4", "RANK": "3"}
    launch.single_process_env(launched)
    assert launched == {"WORLD_SIZE": "4", "RANK": "3"}


# ---- DeepSpeed validation: one line with the reason ------------------------------------------------


def _ds_errors(setup, ds, method="adamw", **sections):
    _, recipe_file = setup
    data = yaml.safe_load(recipe_file("ds-check", method=method).read_text())
    data["train"]["deepspeed"] = ds
    for key, value in sections.items():
        data[key] = value
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, source="r.yaml")
    return info.value.lines


Z = {s: str(REPO / f"configs/deepspeed/zero{s}.json") for s in (1, 2, 3)}


@pytest.mark.parametrize(
    ("ds", "method", "sections", "message"),
    [
        (Z[3], "mezo", {}, "train.deepspeed: ZeRO-3 shards every parameter across ranks, and method 'mezo' perturbs "
         "and updates whole parameters in place (each rank would see only its shard); drop train.deepspeed "
         "(several GPUs: the distributed section, DistZO2)"),
        (Z[2], "mezo", {}, "train.deepspeed: ZeRO-2 shards gradients and optimizer states, which method 'mezo' "
         "(zeroth-order) does not have, and DeepSpeed's engine would replace the ZO update with its own gradient "
         "step; drop train.deepspeed (several GPUs: the distributed section, DistZO2; less memory: the offload "
         "section, ZO2)"),
        (Z[1], "mezo", {"distributed": {"perturbation_parallel": 2}}, "train.deepspeed with the distributed "
         "section: DistZO2 (zeroth-order over several processes) is zoft's own zeroth-order path and DeepSpeed "
         "drives first-order training; drop one of them"),
        (Z[2], "mezo", {"offload": "cpu"}, "train.deepspeed with the offload section: ZO2 block offloading is "
         "zoft's own zeroth-order path and DeepSpeed drives first-order training; drop one of them"),
        (Z[2], "adamw", {"privacy": {"method": "flashdp", "noise_multiplier": 1.0, "clip_bound": 1.0}},
         "train.deepspeed with privacy.method 'flashdp': per-example clipping hooks on every layer and noise added "
         "before the optimizer step need zoft's step, but DeepSpeed's engine buckets, reduces and applies the "
         "gradients itself; drop train.deepspeed (a private run is one process)"),
        (Z[1], "adamw", {"peft": {"method": "lora", "optimizer": "lora_pro"}}, "train.deepspeed with "
         "peft.optimizer 'lora_pro': LoRA-Pro's optimizer needs each adapter's whole A and B matrices and their "
         "gradients, which ZeRO-1 flattens and partitions across ranks; drop train.deepspeed (several GPUs: launch "
         "without it, DDP)"),
        (Z[3], "adamw", {"peft": {"method": "lora", "init": "lora_ga"}}, "train.deepspeed: ZeRO-3 partitions the "
         "weights while the model loads, and peft.init 'lora_ga' needs them whole for its gradient SVD; use "
         "ZeRO-1/2 (configs/deepspeed/zero2.json) with lora_ga"),
        (Z[2], "natural_galore", {}, "train.deepspeed with method 'natural_galore': ZeRO-2 gives the optimizer "
         "flattened, partitioned weights, while Natural GaLore projects each weight matrix's gradient (and the "
         "layer-wise variant steps during the backward); drop train.deepspeed (several GPUs: launch without it, DDP, "
         "layerwise: false)"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "sgd", {}, "train.deepspeed: the "
         "DeepSpeed config has an optimizer section (AdamW), which would replace method 'sgd'; remove that section "
         "so HF builds the recipe's optimizer"),
        ("no/such/zero2.json", "adamw", {}, "train.deepspeed: no/such/zero2.json not found; give the path of a "
         "DeepSpeed JSON file, e.g. configs/deepspeed/zero1.json, zero2.json or zero3.json"),
        ({"zero_optimization": {"stage": 4}}, "adamw", {}, "train.deepspeed: zero_optimization.stage in the inline "
         "config must be 0, 1, 2 or 3, got 4"),
    ],
    ids=["zo-zero3", "zo-zero2", "distributed", "offload", "flashdp", "lora_pro", "lora_ga-zero3", "natural_galore", "sgd-optimizer",
         "missing-file", "bad-stage"],
)
def test_deepspeed_combinations_that_cannot_work_are_refused_with_the_reason(setup, ds, method, sections, message):
    assert _ds_errors(setup, ds, method, **sections) == [f"r.yaml: {message}"]


def test_deepspeed_json_that_does_not_parse_is_one_line(setup, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    assert _ds_errors(setup, str(bad)) == [
        f"r.yaml: train.deepspeed: {bad} is not valid JSON: Expecting property name enclosed in double quotes (line 1)"]


def test_first_order_recipes_accept_every_shipped_zero_stage(setup):
    _, recipe_file = setup
    data = yaml.safe_load(recipe_file("ds-ok").read_text())
    for stage, path in Z.items():
        recipe = validate_recipe({**data, "train": {**data["train"], "deepspeed": path}})
        assert json.loads(Path(recipe.train.model_dump()["deepspeed"]).read_text())["zero_optimization"]["stage"] == stage
    lora_ga = {**data, "peft": {"method": "lora", "init": "lora_ga"}, "train": {**data["train"], "deepspeed": Z[2]}}
    assert validate_recipe(lora_ga).peft.init == "lora_ga"  # ZeRO-1/2 keep whole weights: allowed


def test_missing_deepspeed_package_is_one_line_with_the_pip_command(setup, monkeypatch, capsys):
    _, recipe_file = setup
    path = recipe_file("ds-missing", deepspeed=Z[2])
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # how Python marks a package as not importable
    with pytest.raises(ZoftError, match=r"^train.deepspeed: needs the deepspeed package: pip install 'zoft\[deepspeed\]'$"):
        run.training_arguments(load_recipe(path))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == "zoft: error: train.deepspeed: needs the deepspeed package: pip install 'zoft[deepspeed]'\n"


@needs_deepspeed
def test_shipped_deepspeed_files_are_accepted_by_hf_and_get_their_auto_values_filled():
    check = f"""
import json
from transformers import TrainingArguments
for stage in (1, 2, 3):
    args = TrainingArguments(output_dir="unused", deepspeed="{REPO}/configs/deepspeed/zero%d.json" % stage,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5,
                             report_to="none")
    c = args.hf_deepspeed_config.config
    print(json.dumps([stage, c["zero_optimization"]["stage"], c["train_micro_batch_size_per_gpu"],
                      c["gradient_accumulation_steps"], c["gradient_clipping"], c["bf16"]["enabled"]]))
"""
    proc = subprocess.run([sys.executable, "-c", check], env=ENV, capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert rows == [[s, s, 4, 2, 0.5, False] for s in (1, 2, 3)], proc.stderr[-2000:]


def test_accelerate_presets_load_with_accelerates_own_reader():
    from accelerate.commands.config.config_args import load_config_from_file

    presets = {p.stem: load_config_from_file(str(p)) for p in sorted((REPO / "configs/accelerate").glob("*.yaml"))}
    got = {name: (c.distributed_type.value, c.num_processes, c.num_machines, c.use_cpu) for name, c in presets.items()}
    assert got == {
        "cpu_2proc": ("MULTI_GPU", 2, 1, True),
        "multi_gpu": ("MULTI_GPU", 8, 1, False),
        "multi_node": ("MULTI_GPU", 16, 2, False),
        "single_gpu": ("NO", 1, 1, False),
    }
