"""Run by tests/test_distributed.py under torchrun: a recipe with a `distributed` section through ZoftTrainer."""

import gc
import json
import sys

import torch
import torch.distributed as dist

from zoft import run
from zoft.config import validate_recipe


def main():
    recipe = validate_recipe(json.loads(open(sys.argv[1]).read()))
    if int(__import__("os").environ["RANK"]) == 0:
        run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    dist.barrier()
    trainer.train()
    if dist.get_rank() == 0:
        torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, sys.argv[2])
        off = trainer.offloader
        if off is not None:
            with open(sys.argv[2] + ".json", "w") as fh:
                json.dump({"sliced": off.sliced, "uploads": off.uploads, "uploaded_bytes": off.uploaded_bytes,
                           "stored_dtypes": sorted({str(e[3].dtype) for b in off._stored for e in b})}, fh)
    del trainer
    gc.collect()  # see ASSETS.md: gloo runs can abort at exit without this before destroy_process_group
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
