"""Every shipped recipe (configs/*.yaml) is documented, valid, and runs on a tiny model.

New recipes are picked up by the glob. Each runs with its own method sections unchanged; only the model
(a tiny Llama with the real tokenizer), the data (a small file in the recipe's format, with the recipe's
own columns and labels), the step counts and the output folder are overridden. A run must produce what
its recipe promises (model or adapter files, metrics.json with before/after evaluation, checkpoints, the
trajectory of a zeroth-order run, the privacy report of a private one), and its exported weights
(`zoft export`) must differ from the base model's in exactly the trained layers.

A recipe with a `distributed` section runs here in one process, its layout collapsed to
perturbation_parallel 1 (DistZO2's code path with one rank): that 2 gloo ranks of the same recipe train
exactly like one process is tests/test_distributed.py's job, and starting 2 ranks here would add ~30 s.
"""

import csv
import json
import re
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoft import run
from zoft.config import read_recipe_file, validate_recipe
from zoft.export import dequantize_nf4_state, export

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
STEPS = 2
WORDS = "a warm funny wise film with great acting and a dull plot that drags on far too long for me".split()


def test_the_library_has_a_recipe_per_method_family():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "adamw_lora", "mezo_lora", "qzo_nf4", "addax", "zo2_offload", "distzo2_pertp",
            "lora_ga_pro", "wta_crs_lora", "flashdp_lora", "dpzero_mezo"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_what_how_to_run_and_memory_and_is_valid(path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert len(header) >= 3, f"{path.name}: the recipe must open with a comment block"
    run_line = re.search(r"^# Run:\s+(.*)$", text, re.M)
    assert run_line and f"configs/{path.name}" in run_line.group(1), f"{path.name}: '# Run:' with its own path"
    assert re.search(r"^# What:\s+\S", text, re.M), f"{path.name}: '# What:' line"
    assert re.search(r"^# Memory:\s+\S", text, re.M), f"{path.name}: '# Memory:' line"
    recipe = validate_recipe(read_recipe_file(path), source=str(path))
    run.training_arguments(recipe)  # as `zoft validate` does: TrainingArguments accepts the train keys
    assert recipe.output.dir == f"runs/{path.stem}", f"{path.name}: output.dir should be runs/{path.stem}"


def test_which_method_page_names_every_recipe_and_its_links_resolve():
    page = REPO / "docs" / "which_method.md"
    text = page.read_text()
    missing = [p.name for p in RECIPES if f"configs/{p.name}" not in text]
    assert not missing, f"docs/which_method.md does not mention {missing}"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (page.parent / target).resolve().exists(), f"broken link in which_method.md: {target}"


def _template_fields(template):
    return [f for _, f, _, _ in string.Formatter().parse(template or "") if f]


def _text(i):
    # Lengths from 2 to ~40 words so that a length split (Addax) has rows on both sides.
    n = 2 if i % 2 else 24 + i % 17
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def _tiny_data(raw, folder):
    """A 64-row file in the recipe's data format, with the recipe's own columns and label values."""
    d = raw["data"]
    fmt = d["format"]
    rows = []
    for i in range(64):
        if fmt == "classification":
            labels = list(d["verbalizers"])
            fields = _template_fields(d.get("template")) or [d.get("text_column", "text")]
            row = {f: _text(i) for f in fields}
            row[d.get("label_column", "label")] = str(labels[i % len(labels)])
        elif fmt == "text":
            row = {d.get("text_column", "text"): _text(i)}
        elif fmt == "prompt_completion":
            row = {d.get("prompt_column", "prompt"): _text(i), d.get("completion_column", "completion"): _text(i + 1)}
        elif fmt == "chat":
            row = {d.get("messages_column", "messages"): [{"role": "user", "content": _text(i)},
                                                          {"role": "assistant", "content": _text(i + 1)}]}
        else:
            raise AssertionError(f"no tiny data for format {fmt!r}: extend _tiny_data")
        rows.append(row)
    if fmt == "chat":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = folder / "data.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return str(path)


def _shrink(raw, model_dir, data_path, out_dir):
    """The recipe with a tiny model, tiny data and STEPS steps; method sections as shipped."""
    raw = json.loads(json.dumps(raw))
    raw["model"]["name"] = model_dir
    raw["data"].update(train=data_path, test_size=0.2, max_eval_samples=8)
    raw["data"].pop("eval", None)
    raw["data"].pop("max_train_samples", None)
    raw.setdefault("train", {}).update(
        max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        logging_steps=1, disable_tqdm=True,
    )
    raw["train"].pop("save_strategy", None)
    raw["output"] = {**raw.get("output", {}), "dir": str(out_dir)}
    raw["evaluation"] = {"before": True, "after": True}
    method = raw.get("method")
    if isinstance(method, dict):
        for key in ("zo_batch_size", "fo_batch_size"):  # addax
            if method.get(key):
                method[key] = 4
    peft = raw.get("peft") or {}
    if peft.get("init") == "lora_ga":
        peft.setdefault("lora_ga", {})["num_batches"] = 2
    if raw.get("distributed"):  # one process (see the module docstring), checksums every step
        raw["distributed"].update(perturbation_parallel=1, data_parallel=1, checksum_steps=1)
    return raw


def _weights(folder):
    state = {}
    for f in Path(folder).glob("*.safetensors"):
        state.update(load_file(str(f)))
    return state


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_model_and_keeps_its_promises(path, tiny_llama_dir, tmp_path):
    raw = _shrink(read_recipe_file(path), tiny_llama_dir, _tiny_data(read_recipe_file(path), tmp_path), tmp_path / "run")
    recipe = validate_recipe(raw, source=path.name)
    out = Path(recipe.output.dir)
    run.train(recipe)

    # Promised artifacts.
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer_config.json").is_file()
    if recipe.peft is not None:
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    else:
        assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / f"checkpoint-{STEPS}" / "zoft-complete.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    score = "eval_accuracy" if recipe.data.format == "classification" else "eval_perplexity"
    for when in ("before", "after"):
        assert metrics[when]["eval_loss"] > 0 and score in metrics[when], metrics
    assert metrics["train"]["train_loss"] > 0 and metrics["train"]["epoch"] > 0
    if recipe.method.is_zeroth_order and recipe.method.name != "addax" and recipe.output.save_trajectory:
        records = (out / "trajectory.jsonl").read_text().strip().splitlines()
        steps = [json.loads(r)["step"] for r in records if '"step"' in r and "coefficients" in r]
        assert len(steps) == STEPS, records
    if recipe.privacy is not None:
        assert metrics["privacy"]["method"] == recipe.privacy.method and metrics["privacy"]["epsilon"] > 0
    if recipe.peft is not None and recipe.peft.init == "lora_ga":
        assert (out / run.LORA_GA_INIT_DIR / "adapter_config.json").is_file()

    # Parameters changed, in the trained layers only: the exported weights against the untrained model's.
    result = export(out, tmp_path / "exported")
    exported = _weights(result.out)
    if result.kind == "nf4":
        untrained, _ = run.build_model_and_tokenizer(recipe)  # the same quantization of the same base
        reference, _ = dequantize_nf4_state(untrained.state_dict())
        trainable = {k for k in reference if k.endswith(".weight") and k.rsplit(".", 2)[-2].endswith("proj")}
    else:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
        trainable = set(reference)
        if recipe.peft is not None:
            targets = recipe.peft.target_modules
            trainable = {k for k in reference if k.endswith(".weight") and k.rsplit(".", 2)[-2] in targets}
    assert set(exported) <= set(reference)
    changed = {k for k, v in exported.items() if not torch.equal(v.to(reference[k].dtype), reference[k])}
    assert changed, f"{path.name}: training changed no weight"
    assert changed <= trainable, sorted(changed - trainable)
