"""``zoft`` command line: ``train``, ``validate``, ``plan``, ``replay``, ``export``. Thin: parse, load the recipe,
call run.

zoft never starts processes: for several GPUs or nodes, a launcher starts one ``zoft train`` per
rank (``torchrun --nproc_per_node N -m zoft train r.yaml``, ``accelerate launch -m zoft train r.yaml``).
"""

from __future__ import annotations

import argparse
import sys

from zoft.errors import ZoftError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoft", description="Fine-tune Hugging Face language models when memory is the constraint."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run a recipe: evaluate, train, evaluate, save"), ("validate", "check a recipe and print it resolved")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="recipe YAML file")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-6 train.max_steps=20")
    pl = sub.add_parser("plan", help="estimate peak GPU/CPU memory of a recipe (no weights loaded) and say if it fits")
    pl.add_argument("recipe", help="recipe YAML file")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.per_device_train_batch_size=4")
    pl.add_argument("--gpu-memory", metavar="SIZE", help="plan for a GPU with this much memory, e.g. 80GB or 80GiB "
                    "(default: this machine's free GPU memory)")
    pl.add_argument("--cpu-memory", metavar="SIZE", help="plan for this much host memory, e.g. 256GB "
                    "(default: this machine's available memory)")
    pl.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                    help="processes the launch starts on each machine, each holding its own copy of the model "
                    "(default: the launcher's LOCAL_WORLD_SIZE, else 1)")
    r = sub.add_parser("replay", help="rebuild a zeroth-order run's model from its base model and trajectory")
    r.add_argument("run_dir", help="the run's output folder (has recipe.yaml and trajectory.jsonl)")
    r.add_argument("--out", required=True, help="folder for the rebuilt model")
    e = sub.add_parser("export", help="merge LoRA adapters / dequantize a 4-bit run into a standard HF checkpoint")
    e.add_argument("source", help="a run folder (with recipe.yaml), one of its checkpoint-N folders, or a LoRA adapter folder")
    e.add_argument("--out", required=True, help="folder for the checkpoint (safetensors + config + tokenizer)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the recipe's model.dtype")
    e.add_argument("--base", help="base model of an adapter (default: the recipe's model.name or the adapter's own)")
    return p


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every LoRA wrap; nothing a zoft
    # user can act on (peft 0.21 / transformers 5.24), so the command line does not print it.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _report(e: ZoftError) -> None:
    """One line per problem; under a launcher an error every rank hits (a recipe error, a refusal rank 0
    shared) is printed by rank 0 only, any other one with its rank."""
    from zoft.errors import RecipeError
    from zoft.launch import SharedError, rank, world_size

    prefix = ""
    if world_size() > 1:
        if isinstance(e, (RecipeError, SharedError)) and rank() != 0:
            return
        if not isinstance(e, (RecipeError, SharedError)):
            prefix = f"[rank {rank()}] "
    for line in str(e).splitlines():
        print(f"zoft: error: {prefix}{line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        from zoft import config, run

        if args.command == "validate":
            recipe = config.load_recipe(args.recipe, args.overrides)
            run.training_arguments(recipe)  # TrainingArguments checks its own keys too
            print(config.recipe_to_yaml(recipe), end="")
            print(f"zoft: {args.recipe} is valid", file=sys.stderr)
        elif args.command == "train":
            from zoft import launch

            recipe = config.load_recipe(args.recipe, args.overrides)
            launch.check_process_count(recipe, args.recipe)
            run.train(recipe)
            launch.finish()
        elif args.command == "plan":
            from zoft.plan import parse_size, plan_recipe

            gpu = None if args.gpu_memory is None else parse_size(args.gpu_memory, "--gpu-memory")
            cpu = None if args.cpu_memory is None else parse_size(args.cpu_memory, "--cpu-memory")
            if args.nproc_per_node is not None and args.nproc_per_node < 1:
                raise ZoftError(f"--nproc-per-node: {args.nproc_per_node} is not a process count; use 1 or more")
            recipe = config.load_recipe(args.recipe, args.overrides)
            print(plan_recipe(recipe, gpu_memory=gpu, cpu_memory=cpu, processes=args.nproc_per_node))
        elif args.command == "replay":
            n = run.replay(args.run_dir, args.out)
            print(f"zoft: replayed {n} steps into {args.out}")
        elif args.command == "export":
            from zoft.export import export

            res = export(args.source, args.out, overwrite=args.overwrite, dtype=args.dtype, base=args.base)
            how = {"lora": f"merged {res.merged_modules} LoRA layers into {res.base}",
                   "nf4": f"dequantized {res.merged_modules} NF4 layers", "full": "re-saved the full model"}[res.kind]
            print(f"zoft: {how}; wrote a {res.dtype} Hugging Face checkpoint to {res.out}")
    except ZoftError as e:
        _report(e)
        return 2
    except KeyboardInterrupt:
        print("zoft: interrupted; continue the run with output.resume=true", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
