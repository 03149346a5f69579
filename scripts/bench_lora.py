"""LoRA vs LoRA-Pro vs LoRA-GA vs LoRA-GA + LoRA-Pro vs full fine-tuning on the real SmolLM2-135M.

Task: Rotten Tomatoes reviews as prompt + label completion ("Review: ...\\nSentiment: fresh"), causal-LM
loss on every token, the same fixed batches for every run. For each method and learning rate it
reports the training-loss curve, the held-out loss, held-out label accuracy (" fresh" vs " rotten"
logit at the label position), seconds per step and peak resident memory, and ratios against LoRA.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/bench_lora.py
    python scripts/bench_lora.py --steps 30 --batch-size 8 --lr-grid   # the larger setting (GPU / idle CPU)

Defaults fit about 5 minutes on an idle 2-core CPU (one learning rate per method, see LRS);
``--lr-grid`` runs two per method. ``--methods lora,lora_pro,lora_pro_efficient_removed`` compares zoft's
LoRA-Pro (the paper's algorithm) with plain LoRA and with the removed "efficient" mode (AdamW on LoRA-Pro's
corrected A/B gradients, rebuilt here from ``lora_pro_gradients``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

# One learning rate per method, each the usual order for a short run: adapters move with AdamW at
# ~lr per step whatever their scale, so LoRA-family runs share one value; full fine-tuning of all
# 135M weights needs a much smaller one. --lr-grid adds a second value (x3 / x5) per method.
LRS = {"lora": [1e-3], "lora_ga": [1e-3], "lora_ga_pro": [1e-3], "full": [2e-5], "lora_pro": [1e-3],
       "lora_pro_efficient_removed": [1e-3]}
LR_GRID = {"lora": [1e-3, 3e-3], "lora_ga": [1e-3, 3e-3], "lora_ga_pro": [1e-3, 3e-3], "full": [2e-5, 1e-4],
           "lora_pro": [1e-3, 1e-4], "lora_pro_efficient_removed": [1e-3, 3e-3]}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build_data(tokenizer, n_train: int, n_eval: int, seq_len: int, seed: int = 0):
    """Token tensors for prompt + completion examples, and the label position of each held-out one."""
    from zoft.assets import load_data_asset

    split = load_data_asset("rotten-tomatoes").train_test_split(test_size=0.1, seed=seed)
    eos = tokenizer.eos_token_id

    def encode(rows):
        ids, masks, label_pos, label_ids = [], [], [], []
        for text, label in zip(rows["text"], rows["label"]):
            suffix = tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [eos]
            review = tokenizer("Review: " + text, add_special_tokens=False)["input_ids"]
            review = review[: seq_len - len(suffix) - len(answer)]
            seq = review + suffix + answer
            label_pos.append(len(review) + len(suffix) - 1)  # the logit predicting the label's first token
            label_ids.append(answer[0])
            pad = seq_len - len(seq)
            ids.append(seq + [eos] * pad)
            masks.append([1] * len(seq) + [0] * pad)
        ids, masks = torch.tensor(ids), torch.tensor(masks)
        labels = ids.masked_fill(masks == 0, -100)
        return ids, masks, labels, torch.tensor(label_pos), torch.tensor(label_ids)

    train = encode(split["train"].shuffle(seed=seed).select(range(n_train)))
    held = encode(split["test"].select(range(n_eval)))
    verbalizers = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("fresh", "rotten")]
    return train, held, verbalizers


def batches_of(data, batch_size):
    ids, masks, labels = data[0], data[1], data[2]
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": masks[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, len(ids) - batch_size + 1, batch_size)
    ]


@torch.no_grad()
def evaluate(model, held, verbalizers, batch_size=16):
    model.eval()
    ids, masks, labels, label_pos, label_ids = held
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(ids), batch_size):
        out = model(input_ids=ids[i : i + batch_size], attention_mask=masks[i : i + batch_size])
        logits = out.logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[i : i + batch_size, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += loss.item()
        count += (shift_labels != -100).sum().item()
        rows = torch.arange(logits.shape[0])
        at_label = logits[rows, label_pos[i : i + batch_size]][:, verbalizers]
        predicted = torch.tensor(verbalizers)[at_label.argmax(-1)]
        correct += (predicted == label_ids[i : i + batch_size]).sum().item()
    return total / count, correct / len(ids)


def run_one(method, lr, model_path, train_batches, held, verbalizers, args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zoft.lora import create_lora_pro_optimizer, init_lora_ga
    from zoft.lora.pro import find_lora_pairs, lora_pro_gradients

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    reset_hwm()
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    t0 = time.perf_counter()
    if method == "full":
        params = [p for p in model.parameters() if p.requires_grad]
    elif method in ("lora", "lora_pro", "lora_pro_efficient_removed"):
        model = get_peft_model(model, LoraConfig(**lora))
    else:
        model = init_lora_ga(model, lora, train_batches[: args.ga_batches], num_batches=args.ga_batches)
    init_s = time.perf_counter() - t0
    if method in ("lora_ga_pro", "lora_pro"):
        optimizer = create_lora_pro_optimizer(model, lr=lr)  # the paper's algorithm
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, step_times = [], []
    model.train()
    for batch in train_batches[: args.steps]:
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if method == "lora_pro_efficient_removed":  # zoft's former default: corrected gradients, then AdamW
            for pair in find_lora_pairs(model):
                new_a, new_b = lora_pro_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling)
                pair.A.grad.copy_(new_a)
                pair.B.grad.copy_(new_b)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t)
        losses.append(loss.item())
        print(f"  {method} lr={lr:g} step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    held_loss, held_acc = evaluate(model, held, verbalizers)
    return {
        "method": method,
        "lr": lr,
        "losses": losses,
        "held_loss": held_loss,
        "held_acc": held_acc,
        "s_per_step": statistics.median(step_times),
        "init_s": init_s,
        "peak_mb": vm_hwm_mb(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--ga-batches", type=int, default=2, help="LoRA-GA gradient batches (from the train stream)"
    )
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--lr-grid", action="store_true", help="two learning rates per method")
    parser.add_argument("--methods", default="lora,lora_ga,lora_ga_pro,full")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from zoft.assets import model_asset_path

    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print(
        f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}),"
        f" torch {torch.__version__}, fp32"
    )
    model_path = model_asset_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, held, verbalizers = build_data(
        tokenizer, args.steps * args.batch_size, args.eval_examples, args.seq_len
    )
    train_batches = batches_of(train, args.batch_size)

    grid = LR_GRID if args.lr_grid else LRS
    results = []
    for method in args.methods.split(","):
        for lr in grid[method]:
            results.append(run_one(method, lr, model_path, train_batches, held, verbalizers, args))

    base_loss, base_acc = evaluate_base(model_path, held, verbalizers)
    lora_best = min((r for r in results if r["method"] == "lora"), key=lambda r: r["held_loss"], default=None)
    print()
    print(
        f"SmolLM2-135M, Rotten Tomatoes prompt+label, {args.steps} steps x batch {args.batch_size} x "
        f"{args.seq_len} tokens, r={args.rank}, held-out {args.eval_examples} examples; "
        f"base model: held-out loss {base_loss:.4f}, label acc {base_acc:.2f}"
    )
    checkpoints = sorted({1, max(1, args.steps // 4), max(1, args.steps // 2), args.steps})
    head = " | ".join(f"train loss @{c}" for c in checkpoints)
    print(
        f"| method | lr | {head} | held-out loss | vs LoRA | label acc | s/step | vs LoRA | init s | peak MB | vs LoRA |"
    )
    print("|" + "---|" * (10 + len(checkpoints)))
    for r in results:
        # Each point is the mean over a window of 3 steps ending there (single batches are noisy).
        curve = " | ".join(f"{statistics.mean(r['losses'][max(0, c - 3) : c]):.3f}" for c in checkpoints)

        def ratio(key, r=r):
            return f"{r[key] / lora_best[key]:.2f}" if lora_best else "-"

        print(
            f"| {r['method']} | {r['lr']:g} | {curve} | {r['held_loss']:.4f} | {ratio('held_loss')} | "
            f"{r['held_acc']:.2f} | {r['s_per_step']:.2f} | {ratio('s_per_step')} | {r['init_s']:.1f} | "
            f"{r['peak_mb']:.0f} | {ratio('peak_mb')} |"
        )


def evaluate_base(model_path, held, verbalizers):
    from transformers import AutoModelForCausalLM

    return evaluate(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), held, verbalizers)


if __name__ == "__main__":
    main()
