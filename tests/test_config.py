"""Recipes: the schema, dotted overrides, and one clear line per mistake (never a traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoft.cli import main
from zoft.config import load_recipe
from zoft.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "model": {"name": "smollm2-135m"},
    "data": {"train": "rotten-tomatoes", "format": "classification", "template": "{text} It was",
             "verbalizers": {"fresh": " great", "rotten": " terrible"}},
    "method": "mezo",
    "train": {"learning_rate": 1e-6, "max_steps": 10},
    "output": {"dir": "runs/x"},
}


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _errors(tmp_path, data, overrides=()):
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return [line.split(": ", 1)[1] for line in info.value.lines]


def test_good_recipe_resolves_with_defaults_and_method_shorthand(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert recipe.method.name == "mezo" and recipe.method.is_zeroth_order
    assert recipe.method.eps == 1e-3 and recipe.peft is None
    assert recipe.train.learning_rate == 1e-6 and recipe.output.overwrite is False
    assert recipe.model.trust_remote_code is False


def test_dotted_overrides_are_typed_and_validated_like_the_file(tmp_path):
    path = _write(tmp_path, GOOD)
    recipe = load_recipe(path, ["train.learning_rate=2e-5", "train.max_steps=20", "method.eps=1e-2",
                                "peft.r=4", "train.bf16=false", "peft.target_modules=[q_proj,v_proj]"])
    assert recipe.train.learning_rate == 2e-5 and isinstance(recipe.train.max_steps, int)
    assert recipe.method.name == "mezo" and recipe.method.eps == 1e-2  # shorthand kept, key added
    assert recipe.peft.r == 4 and recipe.peft.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.model_dump()["bf16"] is False  # any TrainingArguments field passes through
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.max_steps=lots"])
    assert info.value.lines == [f"{path}: train.max_steps: Input should be a valid integer, unable to parse string as an integer (got 'lots')"]
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.learning_rate"])
    assert "expected KEY.PATH=VALUE" in info.value.lines[0]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"model": {"name": "m", "dtyp": "float32"}},
         "model.dtyp: unknown key; did you mean 'model.dtype'? (expected one of: name, task, dtype, revision, tokenizer, trust_remote_code, quantization, quantization_blocksize, quantization_target_modules)"),
        ({"method": "mezoo"}, "method.name: Input should be 'mezo', 'qzo', 'addax', 'adamw', 'sgd' or 'natural_galore' (got 'mezoo')"),
        ({"method": {"name": "mezo", "eps": 0}}, "method.eps: Input should be greater than 0 (got 0)"),
        ({"train": {"learning_rat": 1e-6}},
         "train.learning_rat: unknown key (not a transformers.TrainingArguments field); did you mean 'train.learning_rate'?"),
        ({"train": {"output_dir": "x"}}, "train.output_dir: set by output.dir, not in train"),
        ({"data": {"train": "x.csv", "format": "classification", "verbalizers": {"a": " yes"}}},
         "data: format 'classification' needs data.verbalizers with at least two labels"),
        ({"data": {"train": "x.csv", "format": "tabular"}},
         "data.format: Input should be 'text', 'prompt_completion', 'chat' or 'classification' (got 'tabular')"),
        ({"privacy": {"method": "dpzero", "epsilon": 3}}, "privacy.epsilon: unknown key; did you mean"),
        ({"lora": {"r": 8}}, "lora: unknown key"),
        ({"model": None}, "model: expected a section (a mapping of keys), got None"),
        ({"peft": {"method": "prefix_tuning"}},
         "peft.method 'prefix_tuning' is not supported with a zeroth-order method; use lora"),
    ],
)
def test_each_bad_recipe_gets_the_expected_one_line_error(tmp_path, change, expected):
    data = {**GOOD, **change}
    lines = _errors(tmp_path, data)
    assert any(line == expected or line.startswith(expected) for line in lines), lines


def test_missing_required_section_and_several_errors_at_once(tmp_path):
    lines = _errors(tmp_path, {"data": {"format": "text"}, "train": {"max_steps": "x", "warmup_step": 1}})
    assert "model: required key is missing" in lines
    assert "data.train: required key is missing" in lines
    assert any(line.startswith("train.warmup_step: unknown key") for line in lines)
    assert any(line.startswith("train.max_steps: Input should be a valid integer") for line in lines)


def test_file_problems_are_one_line(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.lines == [f"{tmp_path / 'nope.yaml'}: recipe file not found"]
    bad = _write(tmp_path, "model: {name: x\ndata: [", "bad.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert info.value.lines[0].startswith(f"{bad} line ") and "not valid YAML" in info.value.lines[0]
    listing = _write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(listing)
    assert "a recipe is a mapping of sections" in info.value.lines[0]


def test_yaml_is_loaded_safely(tmp_path):
    evil = _write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n", "evil.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(evil)
    assert "not valid YAML" in info.value.lines[0]


def test_cli_validate_prints_resolved_recipe_or_one_line_per_error(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    assert main(["validate", str(path), "train.max_steps=3"]) == 0
    out = capsys.readouterr()
    resolved = yaml.safe_load(out.out)
    assert resolved["train"]["max_steps"] == 3 and resolved["method"]["eps"] == 0.001
    assert main(["validate", str(path), "method.eps=-1", "model.nme=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"zoft: error: {path}: model.nme: unknown key; did you mean 'model.name'? (expected one of: name, task, dtype, revision, tokenizer, trust_remote_code, quantization, quantization_blocksize, quantization_target_modules)",
        f"zoft: error: {path}: method.eps: Input should be greater than 0 (got -1)",
    ]


def test_cli_error_is_not_a_traceback_in_a_real_process(tmp_path):
    path = _write(tmp_path, {**GOOD, "method": {"name": "mezo", "n_directions": 0}})
    proc = subprocess.run([sys.executable, "-m", "zoft", "validate", str(path)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"zoft: error: {path}: method.n_directions: Input should be greater than or equal to 1 (got 0)"


def test_every_shipped_recipe_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_recipe(path)


def test_readme_recipe_reference_is_generated_from_the_schema():
    from zoft.reference import END, START, reference_markdown

    readme = (REPO / "README.md").read_text()
    section = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == reference_markdown().strip(), "run: python -m zoft.reference --write"


def test_yaml_no_means_the_string_no_for_strategies(tmp_path):
    path = _write(tmp_path, "model: {name: m}\ndata: {train: x.txt, format: text}\ntrain: {save_strategy: no}\n")
    assert load_recipe(path).train.save_strategy == "no"
    assert load_recipe(path, ["train.eval_strategy=no"]).train.eval_strategy == "no"
