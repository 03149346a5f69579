"""`zoft plan` against the meter: every shipped recipe (configs/*.yaml) planned, then run for a few steps.

Each row runs ``zoft train`` on the recipe's own model, batch and sequence length in a fresh process and
reads that process's peak memory: on CPU the peak RSS (``ru_maxrss`` of the finished process, from
``os.wait4``; for the multi-process DistZO2 recipe the largest rank's, i.e. the per-process peak), on
CUDA ``torch.cuda.max_memory_allocated`` logged by the trainer (``peak_memory_mb``).

What is compared, on CPU: peak RSS includes the Python/torch runtime and the tokenized data, which
``zoft plan`` does not plan. The script measures that baseline in a fresh process that imports
everything ``zoft train`` imports and builds the tokenizer and the recipe's data, loading no model,
and compares **measured peak - baseline** with the plan's peak for a CPU run (the planned compute
memory plus the planned host memory, or the loading peak if that is higher). The baseline itself is
printed too.

Changes to the recipes, so that the measured run is the planned one: ``train.max_steps`` (a few steps),
one held-out batch at ``per_device_eval_batch_size`` (evaluation before training), no checkpoints, and
every example cut to exactly ``data.max_length`` tokens: the classification template repeats the review
four times (reviews are ~30 tokens, examples are cut on the left to ``max_length``), since the collator
pads a batch to its longest row and the plan is for ``max_length``. Addax keeps its own data: its split
into long and short sequences is the point of the method.

    PYTHONPATH=. python scripts/plan_vs_meter.py                     # all rows (~15 min on 2 CPU cores)
    PYTHONPATH=. python scripts/plan_vs_meter.py --only quickstart,zo2_offload --steps 2
    PYTHONPATH=. python scripts/plan_vs_meter.py --measured runs.json  # re-plan against earlier measurements
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2
LONG_TEMPLATE = "Review: {text} {text} {text} {text}\nSentiment (great or terrible):"
# Extra rows: the shipped quickstart in bf16, where the trained-weight masters (method.master_weights) are a
# setting-dependent term, and ZO2 offload with 16-bit block storage.
EXTRA = {
    "quickstart_bf16": ("quickstart.yaml", ["model.dtype=bfloat16"]),
    "quickstart_bf16_no_masters": ("quickstart.yaml", ["model.dtype=bfloat16", "method.master_weights=none"]),
    "zo2_offload_bf16_storage": ("zo2_offload.yaml", ["offload.storage_dtype=bfloat16"]),
}
PROCESSES = {"distzo2_pertp": 2}  # rows launched with torchrun (per-process peak)
FIXED_MMAP_THRESHOLD = True  # --default-malloc turns it off


def rows(only: list[str] | None) -> dict[str, tuple[Path, list[str]]]:
    table = {p.stem: (p, []) for p in sorted((ROOT / "configs").glob("*.yaml"))}
    table.update({k: (ROOT / "configs" / f, o) for k, (f, o) in EXTRA.items()})
    if only:
        unknown = [n for n in only if n not in table]
        if unknown:
            raise SystemExit(f"--only: unknown rows {unknown}; rows are {', '.join(table)}")
        table = {n: table[n] for n in only}
    return table


def meter_overrides(name: str, path: Path, extra: list[str], steps: int, out: str) -> list[str]:
    """The overrides that make a short, measurable run of the recipe at its own batch and sequence length."""
    from zoft.config import load_recipe

    recipe = load_recipe(path, extra)
    over = extra + [
        f"train.max_steps={steps}",
        "train.save_strategy='no'",
        "train.logging_steps=1",
        "train.disable_tqdm=true",
        "evaluation.before=true",
        "evaluation.after=false",
        f"data.max_eval_samples={recipe.train.per_device_eval_batch_size}",
        "data.max_train_samples=1000",
        "output.save_model=false",
        "output.save_trajectory=false",
        f"output.dir={out}/{name}",
        "output.overwrite=true",
    ]
    if recipe.data.format == "classification" and recipe.method.name != "addax":
        over.append(f"data.template={json.dumps(LONG_TEMPLATE)}")
    if recipe.privacy is not None:  # Poisson batches vary around their mean; fixed ones are the planned batch
        over.append("privacy.sampling=shuffle")
    return over


def _peak_of(argv: list[str], env: dict, log: Path) -> tuple[int, float]:
    """Run ``argv``; return (exit status, peak RSS in MiB of the process or its largest child)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024  # kB -> MiB


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    if FIXED_MMAP_THRESHOLD:
        # glibc serves allocations above this from mmap and returns them on free. Its default threshold starts
        # at 128 KiB but rises to the size of the largest freed block (up to 32 MiB), after which freed
        # activations stay in its heap and RSS stays at the high-water mark of the heap, not of live
        # tensors. Fixing it makes peak RSS count live tensors, as CUDA's max_memory_allocated does.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def measure(name: str, path: Path, over: list[str], out: str) -> dict:
    n = PROCESSES.get(name, 1)
    if n > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", "zoft", "train",
                str(path), *over]
    else:
        argv = [sys.executable, "-m", "zoft", "train", str(path), *over]
    t = time.perf_counter()
    code, peak = _peak_of(argv, _env(), Path(out) / f"{name}.log")
    return {"exit": code, "peak_mib": peak, "seconds": time.perf_counter() - t, "processes": n}


def baseline_worker(path: str, over: list[str]) -> None:
    """Everything ``zoft train`` has before it loads the model: imports, tokenizer, tokenized data."""
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import zoft.cli  # noqa: F401
    import zoft.run  # noqa: F401
    import zoft.trainer  # noqa: F401
    from zoft.config import load_recipe
    from zoft.data import build_datasets
    from zoft.models import load_tokenizer

    recipe = load_recipe(path, over)
    tok = load_tokenizer(recipe.model.name)
    build_datasets(recipe.data, tok, recipe.model.task)


def baseline(out: str) -> tuple[float, float]:
    """(imports only, imports + tokenizer + data) peak RSS in MiB, each a fresh process."""
    path = ROOT / "configs" / "quickstart.yaml"
    over = meter_overrides("baseline", path, [], 1, out)
    code = "import torch, transformers, peft, datasets, zoft.cli, zoft.run, zoft.trainer; from transformers import Trainer"
    c1, imports = _peak_of([sys.executable, "-c", code], _env(), Path(out) / "baseline_imports.log")
    argv = [sys.executable, __file__, "--baseline-worker", json.dumps([str(path), *over])]
    c2, data = _peak_of(argv, _env(), Path(out) / "baseline_data.log")
    if c1 or c2:
        raise SystemExit(f"baseline processes failed (exit {c1}, {c2}); see {out}/baseline_*.log")
    return imports, data


def planned(path: Path, over: list[str], processes: int) -> dict:
    """The plan of the row's recipe for a CPU run (the compute device is this machine's memory)."""
    from zoft.config import load_recipe
    from zoft.plan import plan_of_recipe

    plan = plan_of_recipe(load_recipe(path, over), processes=processes, cuda=False)
    est = plan.chosen
    return {"label": est.label, "planned_mib": est.peak_on_cpu_device() / MiB,
            "compute_mib": est.gpu_total / MiB, "host_mib": est.cpu_total / MiB, "load_mib": est.load_peak / MiB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated rows (recipe file stems, or " + ", ".join(EXTRA) + ")")
    p.add_argument("--steps", type=int, default=3, help="training steps per row")
    p.add_argument("--measured", help="read measurements from this JSON (from --json) instead of running")
    p.add_argument("--json", help="write the measurements to this JSON")
    p.add_argument("--out", default=None, help="folder for run outputs and logs (default: a temporary folder)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's dynamic mmap threshold on (RSS then also holds freed activations)")
    p.add_argument("--baseline-worker", help=argparse.SUPPRESS)  # JSON: [recipe path, overrides...]
    a = p.parse_args()
    if a.baseline_worker:
        path, *over = json.loads(a.baseline_worker)
        baseline_worker(path, over)
        return
    global FIXED_MMAP_THRESHOLD
    FIXED_MMAP_THRESHOLD = not a.default_malloc
    out = a.out or tempfile.mkdtemp(prefix="zoft_plan_meter_")
    Path(out).mkdir(parents=True, exist_ok=True)
    table = rows(a.only.split(",") if a.only else None)
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared), "
          f"load average at start {os.getloadavg()[0]:.1f}; logs in {out}")
    if a.measured:
        data = json.loads(Path(a.measured).read_text())
    else:
        imports, base = baseline(out)
        data = {"baseline_imports_mib": imports, "baseline_mib": base, "rows": {},
                "malloc": "default" if a.default_malloc else "MALLOC_MMAP_THRESHOLD_=131072"}
        for name, (path, extra) in table.items():
            over = meter_overrides(name, path, extra, a.steps, out)
            data["rows"][name] = measure(name, path, over, out)
            r = data["rows"][name]
            print(f"  {name}: exit {r['exit']}, peak {r['peak_mib']:.0f} MiB, {r['seconds']:.0f} s", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(data, indent=1))
    base = data["baseline_mib"]
    print(f"\nallocator: {data.get('malloc')}")
    print(f"baseline: {data['baseline_imports_mib']:.0f} MiB (imports only), {base:.0f} MiB (imports, tokenizer, "
          "data): subtracted from every measured peak\n")
    print("| recipe | plan (setting) | planned MiB | measured peak - baseline MiB | measured / planned |")
    print("|---|---|---:|---:|---:|")
    worst = 0.0
    for name, (path, extra) in table.items():
        r = data["rows"].get(name)
        if r is None:
            continue
        plan = planned(path, meter_overrides(name, path, extra, a.steps, out), r["processes"])
        if r["exit"] != 0:
            print(f"| {name} | {plan['label']} | {plan['planned_mib']:.0f} | run failed (exit {r['exit']}) | - |")
            continue
        delta = r["peak_mib"] - base
        ratio = delta / plan["planned_mib"]
        worst = max(worst, abs(ratio - 1))
        per = " (per process)" if r["processes"] > 1 else ""
        print(f"| {name} | {plan['label']}{per} | {plan['planned_mib']:.0f} | {delta:.0f} | {ratio:.2f} |")
    print(f"\nlargest deviation: {100 * worst:.0f}%")


if __name__ == "__main__":
    main()
