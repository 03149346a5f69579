"""Run by tests/test_distributed.py under torchrun: a recipe with a `distributed` section through ZoftTrainer.

Optional third argument ``gpu-map``: give the offloaded model the two-entry ``hf_device_map`` the offloader
sets when its blocks live on the CPU and compute on a GPU (the CPU offload path has none), then evaluate
before training and save after it, as `zoft train` does. accelerate refuses to prepare such a model in
distributed mode; DistZO2 must not ask it to.
"""

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
    gpu_map = sys.argv[3:] == ["gpu-map"]
    if gpu_map:
        trainer.model.hf_device_map = {"": "cpu", trainer.offloader.blocks_name: "zoft-offload"}
        before = trainer.evaluate()
    dist.barrier()
    trainer.train()
    if gpu_map:
        after = trainer.evaluate()
        trainer.save_model()
        if dist.get_rank() == 0:
            with open(sys.argv[2] + ".eval.json", "w") as fh:
                json.dump({"before": before["eval_loss"], "after": after["eval_loss"]}, fh)
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
