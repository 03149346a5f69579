"""Data formats: what is tokenized, which tokens carry loss, and the errors for bad rows."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from zoft.config import DataSection
from zoft.data import build_datasets
from zoft.data.collate import VerbalizerCollator
from zoft.errors import DataError
from zoft.losses import verbalizer_scores


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _cfg(**kw):
    return DataSection(**{"test_size": 0.25, "max_length": 64, **kw})


def test_prompt_completion_puts_loss_on_the_completion_and_eos_only(tok, tmp_path):
    rows = [{"prompt": f"Q{i}: 2+2?", "completion": " 4"} for i in range(8)]
    data = build_datasets(_cfg(train=_jsonl(tmp_path / "pc.jsonl", rows), format="prompt_completion"), tok)
    ex = data.train[0]
    prompt_ids = tok(rows[0]["prompt"].replace("Q0", ex and "Q0"))["input_ids"]
    supervised = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert supervised == tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    batch = data.collator([data.train[0], data.train[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_chat_masks_everything_but_the_assistant_turns(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi there"}]}
            for i in range(8)]
    data = build_datasets(_cfg(train=_jsonl(tmp_path / "chat.jsonl", rows), format="chat"), tok)
    ex = data.train[0]
    text = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert text.startswith("hi there") and "hello" not in text and "user" not in text
    assert text.strip().endswith("<|im_end|>") or "hi there" in text  # the turn's end token is learned too


def test_text_format_packs_into_blocks(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"line number {i} of a small corpus" for i in range(200)))
    data = build_datasets(_cfg(train=str(path), format="text", max_length=16, packing=True), tok)
    assert all(len(x) == 16 for x in data.train["input_ids"])
    assert data.train[0]["labels"] == data.train[0]["input_ids"]


def test_classification_tokenizes_template_and_maps_labels(tok, sentiment_csv):
    cfg = _cfg(train=sentiment_csv, format="classification", template="Review: {text}\nSentiment:",
               verbalizers={"fresh": " great", "rotten": " terrible"})
    data = build_datasets(cfg, tok)
    assert data.kind == "verbalizer" and data.label_names == ["fresh", "rotten"]
    assert len(data.train) == 60 and len(data.eval) == 20
    assert isinstance(data.collator, VerbalizerCollator) and data.collator.single_token
    ex = data.train[0]
    assert tok.decode(ex["input_ids"]).startswith("Review: ") and ex["cls_label"] in (0, 1)
    batch = data.collator([data.train[i] for i in range(3)])
    # Left padding: every prompt ends at the last position; positions skip the pads.
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert batch["position_ids"][0, -1].item() == batch["attention_mask"][0].sum().item() - 1
    assert batch["candidate_ids"].tolist() == [tok(" great", add_special_tokens=False)["input_ids"][0],
                                               tok(" terrible", add_special_tokens=False)["input_ids"][0]]


@pytest.mark.parametrize("score", [None, "mean", "sum"])
def test_multi_token_verbalizers_score_the_mean_token_log_prob_by_default(tok, tiny_llama_dir, sentiment_csv, score):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    words = [" really truly great", " terrible"]  # different token lengths: the sum favours the short one
    extra = {} if score is None else {"verbalizer_score": score}
    cfg = _cfg(train=sentiment_csv, format="classification", template="{text} It was",
               verbalizers={"fresh": words[0], "rotten": words[1]}, **extra)
    data = build_datasets(cfg, tok)
    assert [len(c) for c in data.collator.candidates] == [3, 1]
    rows = [data.train[i] for i in range(3)]  # different lengths -> left padding in the batch
    reduce = torch.sum if score == "sum" else torch.mean  # MeZO's default: the mean over the word's tokens
    with torch.no_grad():
        scores = verbalizer_scores(model, data.collator(rows))
        # Reference: plain transformers on each (prompt, word) pair alone, unpadded.
        for i, row in enumerate(rows):
            for c, word in enumerate(words):
                w = tok(word, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([row["input_ids"] + w])
                logp = model(ids).logits[0, :-1].log_softmax(-1)
                positions = torch.arange(len(w)) + len(row["input_ids"]) - 1
                ref = reduce(logp[positions].gather(-1, torch.tensor(w)[:, None]).squeeze(-1))
                assert scores[i, c].item() == pytest.approx(ref.item(), abs=1e-5)


def test_single_token_fast_path_matches_unpadded_reference(tok, tiny_llama_dir, sentiment_csv):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    cfg = _cfg(train=sentiment_csv, format="classification", template="{text} It was",
               verbalizers={"fresh": " great", "rotten": " terrible"})
    data = build_datasets(cfg, tok)
    rows = [data.train[i] for i in range(4)]  # different lengths -> left padding in the batch
    with torch.no_grad():
        scores = verbalizer_scores(model, data.collator(rows))
        for i, row in enumerate(rows):
            logp = model(torch.tensor([row["input_ids"]])).logits[0, -1].log_softmax(-1)
            ref = logp[data.collator.candidates[0][0]], logp[data.collator.candidates[1][0]]
            assert scores[i].tolist() == pytest.approx([ref[0].item(), ref[1].item()], abs=1e-4)


def test_bad_rows_and_files_name_the_file_row_and_fix(tok, tmp_path, sentiment_csv):
    with pytest.raises(DataError, match=r"data.train: file .*missing.jsonl not found"):
        build_datasets(_cfg(train=str(tmp_path / "missing.jsonl"), format="text"), tok)
    bad_ext = tmp_path / "data.xlsx"
    bad_ext.write_text("x")
    with pytest.raises(DataError, match=r"cannot read .*data.xlsx: use a .jsonl, .json, .csv, .parquet or .txt"):
        build_datasets(_cfg(train=str(bad_ext), format="text"), tok)
    with pytest.raises(DataError, match=r"column 'review' not found \(columns: text, label\); set data.text_column"):
        build_datasets(_cfg(train=sentiment_csv, format="text", text_column="review"), tok)
    rows = [{"text": "fine", "label": "fresh"}] * 5 + [{"text": "meh", "label": "neutral"}] + [{"text": "ok", "label": "rotten"}] * 5
    path = _jsonl(tmp_path / "labels.jsonl", rows)
    cfg = _cfg(train=path, eval=path, format="classification", template="{text}",
               verbalizers={"fresh": " great", "rotten": " terrible"})
    with pytest.raises(DataError, match=r"labels.jsonl\) row 6: label 'neutral' is not one of the verbalizer labels \(fresh, rotten\)"):
        build_datasets(cfg, tok)
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "c"}]
    path = _jsonl(tmp_path / "pc.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2: column 'prompt' should be text, got int 3"):
        build_datasets(_cfg(train=path, eval=path, format="prompt_completion"), tok)
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1: no assistant message"):
        build_datasets(_cfg(train=path, eval=path, format="chat"), tok)
    with pytest.raises(DataError, match=r"template may only name columns"):
        build_datasets(_cfg(train=sentiment_csv, format="classification", template="{review} was",
                            verbalizers={"fresh": " a", "rotten": " b"}), tok)


def test_trainer_evaluates_and_trains_on_mean_verbalizer_scores(tok, tiny_llama_dir, sentiment_csv, tmp_path):
    """eval_loss / eval_accuracy and the training loss of a recipe use the mean token log-probability."""
    from conftest import tiny_recipe

    from zoft import run
    from zoft.config import validate_recipe

    words = {"fresh": " really truly great", "rotten": " terrible"}
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "out", method="adamw",
                                         data={"verbalizers": words, "max_eval_samples": 8}))
    trainer = run.build_trainer(recipe)
    model = trainer.model.eval()
    word_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words.values()]

    def reference_scores(rows):
        out = torch.empty(len(rows), len(word_ids))
        for i, row in enumerate(rows):
            for c, w in enumerate(word_ids):
                logp = model(torch.tensor([row["input_ids"] + w])).logits[0, :-1].log_softmax(-1)
                positions = torch.arange(len(w)) + len(row["input_ids"]) - 1
                out[i, c] = logp[positions].gather(-1, torch.tensor(w)[:, None]).mean()
        return out

    held = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    with torch.no_grad():
        ref = reference_scores(held)
        labels = torch.tensor([r["cls_label"] for r in held])
        metrics = trainer.evaluate()
        assert metrics["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(ref, labels).item(), abs=1e-5)
        assert metrics["eval_accuracy"] == (ref.argmax(-1) == labels).float().mean().item()
        rows = [trainer.train_dataset[i] for i in range(4)]
        loss = trainer.compute_loss(model, trainer.data_collator(rows))
        want = torch.nn.functional.cross_entropy(reference_scores(rows), torch.tensor([r["cls_label"] for r in rows]))
        assert loss.item() == pytest.approx(want.item(), abs=1e-5)
