"""DistZO2 with gloo and 2 processes (torchrun): PertP and DP match the single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distzo_worker import tiny, train

from zoft.errors import ZoftError
from zoft.zo.distributed import DistZO, DistZOConfig, PertPSampler, resolve_layout

HERE = Path(__file__).parent


def torchrun(args, nproc=2, timeout=240):
    env = dict(os.environ, PYTHONPATH=f"{HERE.parent}{os.pathsep}{HERE}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def single_process():
    model = tiny()
    _, log = train(DistZO(DistZOConfig(), world_size=1, rank=0), model)
    return json.loads(json.dumps(log)), model.state_dict()  # as the workers report it


@pytest.mark.parametrize("pp", [2, 1], ids=["pertp", "dp"])
def test_two_gloo_ranks_end_with_the_weights_of_the_single_process_run(single_process, tmp_path, pp):
    ref_log, ref_state = single_process
    out = str(tmp_path / "run")
    torchrun([str(HERE / "distzo_worker.py"), "train", str(pp), out])
    r0, r1 = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1))
    assert r0["log"] == r1["log"]  # every rank applied the same updates
    state = torch.load(out + ".pt")
    if pp == 2:
        # PertP: same batch, same z, each loss computed once on one rank: bit-identical.
        assert r0["log"] == ref_log
        for n, t in ref_state.items():
            assert torch.equal(t, state[n]), n
        assert r0["scalars_sent"] == 3 * 1 + 4  # one loss per step, plus 4 checksums
    else:
        # DP: the mean of two half-batch mean losses equals the full-batch mean up to rounding.
        # fp32 losses (~4.6) round at ~5e-7, so g = dL / 2eps (2eps = 0.02) may differ by ~5e-5, and a
        # weight by lr * sum_t |dg_t| * |z| (|z| < 6): the bound checked below, ~1e-5.
        dg = [abs(a["coefficients"][0][1] - b["coefficients"][0][1]) for a, b in zip(ref_log, r0["log"])]
        assert max(dg) < 1e-4
        bound = 1e-2 * sum(dg) * 6 + 1e-7
        for n, t in ref_state.items():
            assert (t - state[n]).abs().max().item() <= bound, n
        assert r0["scalars_sent"] == 3 * 2 + 4


def test_data_parallel_ranks_with_the_paired_forward_match_their_two_forward_run(tmp_path):
    out = str(tmp_path / "paired")
    torchrun([str(HERE / "distzo_worker.py"), "train-paired", "1", out])
    r0, r1 = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1))
    assert r0["log"] == r1["log"]  # every rank applied the same updates
    for r in (r0, r1):
        # Each rank's (L+, L-) from one doubled forward are the two forwards' losses bit for bit (CPU), so
        # the all-gathered estimates and the weights are those of DP with two forwards.
        assert r["log"] == r["unpaired_log"] and r["same_weights"]
    # 2 runs x 3 steps x (L+, L-), plus a checksum per step each
    assert r0["scalars_sent"] == 2 * (3 * 2 + 3)


def test_checksum_fails_loudly_on_every_rank_when_weights_diverge(tmp_path):
    out = str(tmp_path / "div")
    torchrun([str(HERE / "distzo_worker.py"), "diverge", "2", out])
    for r in (0, 1):
        msg = json.loads(Path(f"{out}.{r}.json").read_text())["raised"]
        assert msg and msg.startswith("DistZO2: trained parameters diverged across ranks at step 7")


def test_layout_misuse_gets_one_line():
    with pytest.raises(ZoftError, match="perturbation_parallel: 2 needs an even number of processes, got 3"):
        resolve_layout(DistZOConfig(perturbation_parallel=2), 3)
    with pytest.raises(ZoftError, match=r"2 x data_parallel 3 = 6 does not match the 4 processes launched"):
        resolve_layout(DistZOConfig(perturbation_parallel=2, data_parallel=3), 4)
    assert resolve_layout(DistZOConfig(perturbation_parallel=2), 4) == (2, 2)


def test_pertp_sampler_gives_partner_ranks_the_same_batch_under_round_robin_sharding():
    pp, dp, bs = 2, 2, 3
    order = list(PertPSampler(14, bs, pp, seed=5))
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    world = pp * dp
    per_rank = {r: batches[r::world] for r in range(world)}  # accelerate's BatchSamplerShard order
    assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[2], []))  # DP shards are disjoint
    assert sorted(sum(per_rank[0] + per_rank[2], [])) == sorted(torch.randperm(14, generator=torch.Generator()
                                                                               .manual_seed(5)).tolist()[:12])
    for r in range(world):  # the sampler's own sharding (for loaders nobody shards) gives the same batches
        own = list(PertPSampler(14, bs, pp, seed=5, shard=(r, world)))
        assert [own[i : i + bs] for i in range(0, len(own), bs)] == per_rank[r]


def test_recipe_with_pertp_under_torchrun_trains_exactly_like_one_process(tiny_llama_dir, sentiment_csv, tmp_path):
    from conftest import tiny_recipe

    from zoft import run
    from zoft.config import validate_recipe

    def recipe(out, **sections):
        return tiny_recipe(tiny_llama_dir, sentiment_csv, out, train={"save_strategy": "no", "max_steps": 3},
                           **sections)

    single = validate_recipe(recipe(tmp_path / "one", distributed={"perturbation_parallel": 1}))
    run.prepare_output_dir(single)
    trainer = run.build_trainer(single)  # a 1-process DistZO with the PertP-ordered sampler's layout
    trainer._get_train_sampler = lambda *a, **k: PertPSampler(len(trainer.train_dataset), 4, 1, 7)
    trainer.train()
    path = tmp_path / "pertp.json"
    path.write_text(json.dumps(recipe(str(tmp_path / "two"), distributed={"perturbation_parallel": 2,
                                                                           "checksum_steps": 1})))
    torchrun([str(HERE / "distzo_trainer_worker.py"), str(path), str(tmp_path / "two.pt")])
    two = torch.load(tmp_path / "two.pt")
    from zoft.zo.trajectory import read_trajectory

    assert read_trajectory(tmp_path / "one" / "trajectory.jsonl")[1] == read_trajectory(
        tmp_path / "two" / "trajectory.jsonl")[1]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), two[n]), n
