"""Held-out accuracy before training with verbalizers scored by the mean vs the sum of token log-probs.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/bench_verbalizer_score.py
    python scripts/bench_verbalizer_score.py --max-eval 100 --pairs "great,terrible"

The quickstart recipe (configs/quickstart.yaml: SmolLM2-135M, Rotten Tomatoes, its template and
held-out split) evaluated before any training, once per verbalizer pair. For each pair one forward per
(example, word) serves both scorings (``data.verbalizer_score: mean`` and ``sum``), so the two columns
differ by the scoring only. With one-token words both are the same number by construction.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ["great,terrible", "masterful,abysmal", "great,abysmal", "masterful,terrible"]


def evaluate_pair(recipe, model, tokenizer, words: tuple[str, str], batch_rows: int) -> dict:
    """Accuracy and loss of the held-out split under both scorings, from one set of forwards."""
    from zoft.data import build_datasets
    from zoft.data.collate import VerbalizerCollator
    from zoft.losses import verbalizer_scores_from_logits

    data_cfg = recipe.data.model_copy(update={"verbalizers": {"fresh": " " + words[0], "rotten": " " + words[1]}})
    data = build_datasets(data_cfg, tokenizer)
    candidates = data.collator.candidates
    collators = {s: VerbalizerCollator(tokenizer.pad_token_id, candidates, s) for s in ("mean", "sum")}
    per_batch = max(1, batch_rows // (len(candidates) if not data.collator.single_token else 1))
    scores = {s: [] for s in collators}
    labels = []
    with torch.no_grad():
        for start in range(0, len(data.eval), per_batch):
            rows = [data.eval[i] for i in range(start, min(start + per_batch, len(data.eval)))]
            batches = {s: c(rows) for s, c in collators.items()}
            b = batches["mean"]
            kwargs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
            if "candidate_ids" in b:
                kwargs["logits_to_keep"] = 1
            logits = model(**kwargs).logits
            for s, batch in batches.items():
                scores[s].append(verbalizer_scores_from_logits(logits, batch))
            labels.append(b["cls_labels"])
    labels = torch.cat(labels)
    out = {"tokens": [len(c) for c in candidates], "n": len(labels)}
    for s, parts in scores.items():
        sc = torch.cat(parts)
        out[s] = {
            "accuracy": (sc.argmax(-1) == labels).float().mean().item(),
            "loss": torch.nn.functional.cross_entropy(sc, labels).item(),
            "predicts_fresh": (sc.argmax(-1) == 0).float().mean().item(),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--max-eval", type=int, default=300, help="held-out examples (the quickstart's 300)")
    parser.add_argument("--pairs", nargs="*", default=PAIRS, help="'fresh word,rotten word' (a space is prepended)")
    parser.add_argument("--batch-rows", type=int, default=32, help="model rows per forward")
    args = parser.parse_args()

    from zoft.config import load_recipe
    from zoft.run import build_model_and_tokenizer

    recipe = load_recipe(args.recipe, [f"data.max_eval_samples={args.max_eval}"])
    model, tokenizer = build_model_and_tokenizer(recipe)
    model.eval()
    print(f"# {recipe.model.name}, {args.recipe}, {args.max_eval} held-out examples, before training; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| fresh / rotten words | tokens | mean: accuracy | sum: accuracy | mean: loss | sum: loss "
          "| mean: share predicted fresh | sum: share predicted fresh |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for pair in args.pairs:
        words = tuple(w.strip() for w in pair.split(","))
        t0 = time.perf_counter()
        r = evaluate_pair(recipe, model, tokenizer, words, args.batch_rows)
        m, s = r["mean"], r["sum"]
        print(f"| {words[0]} / {words[1]} | {r['tokens'][0]} / {r['tokens'][1]} | {m['accuracy']:.3f} | "
              f"{s['accuracy']:.3f} | {m['loss']:.3f} | {s['loss']:.3f} | {m['predicts_fresh']:.2f} | "
              f"{s['predicts_fresh']:.2f} |", flush=True)
        print(f"#   ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
