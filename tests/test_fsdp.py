"""FSDP (train.fsdp, accelerate launch with FSDP): the methods that need whole tensors are refused in one line."""

import pytest

from zoft import launch
from zoft.cli import main
from zoft.config import validate_recipe
from zoft.errors import RecipeError

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}
FLASHDP = {"method": "flashdp", "noise_multiplier": 1.0, "clip_bound": 1.0, "sampling": "shuffle"}
LORA = {"method": "lora", "r": 4}


def _recipe(method="adamw", fsdp="full_shard auto_wrap", **sections):
    data = {
        "model": {"name": "unused-model"},
        "data": {"train": "unused.csv", "format": "classification", "template": "{text} It was",
                 "verbalizers": {"fresh": " great", "rotten": " terrible"}},
        "method": {"name": method},
        "train": {"learning_rate": 1e-3, "max_steps": 2},
        "output": {"dir": "/nonexistent/zoft-fsdp-test-out"},  # never written: refused before the run starts
    }
    if fsdp is not None:
        data["train"]["fsdp"] = fsdp
    data.update(sections)
    return data


def _errors(data):
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, source="r.yaml")
    return info.value.lines


DROP = "drop train.fsdp"
LAUNCH_DROP = "launch without the FSDP config (accelerate launch --multi_gpu gives DDP)"


def _cases(source, drop):
    return [
        ("mezo", {}, f"{source}: FSDP shards every weight across ranks, and method 'mezo' perturbs and updates whole "
         f"weights in place between forwards (each rank would see only its shard); {drop} (several GPUs: the "
         "distributed section, DistZO2; less memory: the offload section, ZO2)"),
        ("mezo", {"offload": "cpu"}, f"{source} with the offload section: ZO2 block offloading is zoft's own "
         f"zeroth-order path, and FSDP shards the weights for first-order training; {drop} or the offload section"),
        ("mezo", {"distributed": {"perturbation_parallel": 2}}, f"{source} with the distributed section: DistZO2 "
         "(zeroth-order over several processes) is zoft's own zeroth-order path, and FSDP shards the weights for "
         f"first-order training; {drop} or the distributed section"),
        ("adamw", {"peft": {**LORA, "optimizer": "lora_pro"}}, f"{source} with peft.optimizer 'lora_pro': LoRA-Pro's "
         "optimizer needs each adapter's whole A and B matrices and their gradients, which FSDP shards across "
         f"ranks; {drop} (several GPUs: DDP)"),
        ("natural_galore", {}, f"{source} with method 'natural_galore': FSDP gives the optimizer flattened shards "
         f"of the weights, while Natural GaLore takes the SVD of each whole weight matrix's gradient; {drop} "
         "(several GPUs: DDP, with method.layerwise: false)"),
        ("adamw", {"privacy": FLASHDP}, f"{source} with privacy.method 'flashdp': per-example clipping hooks on "
         "every layer and noise added before the optimizer step need zoft's step on whole weights, but FSDP shards "
         f"the weights and reduces the gradients itself; {drop} (a private run is one process)"),
    ]


IDS = ["mezo", "offload", "distributed", "lora_pro", "natural_galore", "flashdp"]


@pytest.mark.parametrize(("method", "sections", "message"), _cases("train.fsdp", DROP), ids=IDS)
def test_train_fsdp_with_a_method_that_needs_whole_tensors_is_one_line(method, sections, message):
    assert _errors(_recipe(method, **sections)) == [f"r.yaml: {message}"]


@pytest.mark.parametrize(("method", "sections", "message"),
                         _cases("accelerate launch with FSDP (ACCELERATE_USE_FSDP=true)", LAUNCH_DROP), ids=IDS)
def test_accelerate_fsdp_launch_with_a_method_that_needs_whole_tensors_is_one_line(method, sections, message):
    recipe = validate_recipe(_recipe(method, fsdp=None, **sections))  # valid as a recipe: the launch is the problem
    with pytest.raises(launch.SharedError) as info:
        launch.fit_recipe_to_launch(recipe, FSDP_ENV)
    assert str(info.value) == message
    with pytest.raises(launch.SharedError):  # one process started by accelerate with FSDP is refused too
        launch.fit_recipe_to_launch(recipe, {"ACCELERATE_USE_FSDP": "True"})


@pytest.mark.parametrize("fsdp", ["full_shard auto_wrap", True, ["full_shard", "auto_wrap"]])
def test_first_order_recipes_with_fsdp_still_validate(fsdp):
    plain = validate_recipe(_recipe("adamw", fsdp=fsdp))
    assert plain.train.model_dump()["fsdp"] == fsdp
    assert validate_recipe(_recipe("adamw", fsdp=fsdp, peft=LORA)).peft.method == "lora"
    assert validate_recipe(_recipe("sgd", fsdp=fsdp)).method.name == "sgd"
    launched = validate_recipe(_recipe("adamw", fsdp=None, peft=LORA))
    assert launch.fit_recipe_to_launch(launched, FSDP_ENV) is launched  # HF's FSDP runs it as is


@pytest.mark.parametrize("off", ["", None, False, []])
def test_fsdp_off_values_do_not_refuse_zeroth_order(off):
    assert validate_recipe(_recipe("mezo", fsdp=off)).method.name == "mezo"
    assert launch.fit_recipe_to_launch(validate_recipe(_recipe("mezo", fsdp=None)), {"ACCELERATE_USE_FSDP": "false"})


def test_cli_train_under_an_accelerate_fsdp_launch_prints_the_one_line(tmp_path, monkeypatch, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe("mezo", fsdp=None)))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == (
        "zoft: error: accelerate launch with FSDP (ACCELERATE_USE_FSDP=true): FSDP shards every weight across ranks, "
        "and method 'mezo' perturbs and updates whole weights in place between forwards (each rank would see only "
        f"its shard); {LAUNCH_DROP} (several GPUs: the distributed section, DistZO2; less memory: the offload "
        "section, ZO2)\n"
    )
