import os

# Nothing in the test suite may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import csv

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer (from the packaged asset), saved alone into a folder."""
    from transformers import AutoTokenizer

    from zoft import assets

    folder = tmp_path_factory.mktemp("tokenizer")
    tok = AutoTokenizer.from_pretrained(assets.model_asset_path("smollm2-135m"))
    tok.save_pretrained(folder)
    return str(folder)


TINY_LLAMA = dict(  # the in-memory test model: 2 layers, grouped-query attention, a toy vocabulary
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed=0, **config):
    """A fresh :data:`TINY_LLAMA` (``config`` overrides its fields), initialized from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))


def make_tiny_llama(folder, tokenizer_dir, *, tie=True, seed=0, hidden=32, layers=2):
    """A 2-layer Llama with the real tokenizer, saved as an ordinary HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def write_reviews_csv(path):
    """80 labelled toy reviews (fresh / rotten, alternating) as a CSV file; returns its path as a string."""
    good = ["a joy to watch", "brilliant and moving", "funny, warm, wise", "a triumph", "great fun"]
    bad = ["a dull mess", "tedious and flat", "painfully unfunny", "a waste of time", "boring"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(40):
            w.writerow([good[i % 5] + f" #{i}", "fresh"])
            w.writerow([bad[i % 5] + f" #{i}", "rotten"])
    return str(path)


@pytest.fixture
def sentiment_csv(tmp_path):
    """A small review file in the Rotten Tomatoes layout (text, label fresh/rotten)."""
    return write_reviews_csv(tmp_path / "reviews.csv")


def tiny_recipe(model_dir, data_path, out_dir, **sections):
    """A recipe dict in the quickstart's shape, on a tiny model and small data."""
    recipe = {
        "model": {"name": model_dir},
        "data": {
            "train": data_path,
            "format": "classification",
            "template": "Review: {text}\nSentiment:",
            "verbalizers": {"fresh": " great", "rotten": " terrible"},
            "test_size": 0.2,
            "max_length": 32,
        },
        "method": {"name": "mezo", "eps": 1e-3},
        "train": {
            "learning_rate": 1e-3,
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "logging_steps": 2,
            "save_steps": 2,
            "seed": 7,
            "disable_tqdm": True,
        },
        "output": {"dir": str(out_dir)},
        "evaluation": {"before": False, "after": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def train_recipe(recipe_dict):
    """Validate a recipe dict, prepare its output folder, build its trainer and train; returns the trainer."""
    from zoft import run
    from zoft.config import validate_recipe

    recipe = validate_recipe(recipe_dict)
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer.train()
    return trainer


def train_until_killed(recipe, at_step):
    """Build ``recipe``'s trainer and train it until a KeyboardInterrupt at the end of step ``at_step`` (a
    run killed mid-training); returns the trainer so a caller can release what it holds."""
    from transformers import TrainerCallback

    from zoft import run

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                raise KeyboardInterrupt

    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer.add_callback(KillAt())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return trainer


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB; skips the test where /proc is missing."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    pytest.skip("needs /proc/self/status (Linux)")
