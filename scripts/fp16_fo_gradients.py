"""How close Addax's first-order gradient stays to fp32 under each autocast, with and without a loss scale.

Why Addax refuses ``train.fp16`` (docs/addax.md): its in-place first-order part cannot honour HF's dynamic
loss scale (a step already applied cannot be skipped on overflow), and without a scale fp16 activation
gradients underflow. This prints, for the quickstart model and data (SmolLM2-135M, Rotten Tomatoes by prompt
+ verbalizers, one batch of the first-order side), the gradient of the verbalizer loss under fp32, bf16
autocast (what Addax runs with ``train.bf16``), fp16 autocast unscaled and fp16 autocast with the 2^16 scale
HF starts from, each against the fp32 gradient: relative L2 error, and the share of entries that are
non-zero in fp32 but exactly zero (underflowed) in the variant. CPU autocast here; CUDA's fp16 kernels
round alike but were not measured.

    PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/fp16_fo_gradients.py [--batch 16]
"""

from __future__ import annotations

import argparse
import contextlib
import platform

import torch

from zoft import run
from zoft.config import load_recipe
from zoft.losses import verbalizer_loss, verbalizer_scores


def gradient(model, batch, dtype: torch.dtype | None, scale: float) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        scores = verbalizer_scores(model, batch)
    loss = verbalizer_loss(scores.float(), batch["cls_labels"])
    grads = torch.autograd.grad(loss * scale, params)
    return [g / scale for g in grads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--recipe", default="configs/quickstart.yaml")
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe, [f"train.per_device_train_batch_size={args.batch}", "output.dir=/tmp/zoft-fp16fo",
                                       "output.overwrite=true"])
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    model = trainer.model.eval()  # dropout off: every variant differentiates the same function
    batch = next(iter(trainer.get_train_dataloader()))
    reference = gradient(model, batch, None, 1.0)
    ref_sq = sum(float(r.double().square().sum()) for r in reference)
    nonzero = sum(int((r != 0).sum()) for r in reference)
    print(f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"{args.recipe}, batch {args.batch}, {sum(r.numel() for r in reference):,} gradient entries")
    print("| autocast | loss scale | relative L2 error vs fp32 | underflowed (non-zero in fp32, 0 here) |")
    print("|---|---|---|---|")
    for name, dtype, scale in (("bf16", torch.bfloat16, 1.0), ("fp16", torch.float16, 1.0),
                               ("fp16", torch.float16, 2.0**16)):
        grads = gradient(model, batch, dtype, scale)
        err_sq = sum(float((g - r).double().square().sum()) for g, r in zip(grads, reference))
        lost = sum(int(((g == 0) & (r != 0)).sum()) for g, r in zip(grads, reference))
        print(f"| {name} | {scale:g} | {(err_sq / ref_sq) ** 0.5:.3e} | {lost / nonzero:.3%} |")

if __name__ == "__main__":
    main()
