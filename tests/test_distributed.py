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


def torchrun(args, nproc=2, timeout=900):  # generous: a loaded 2-core machine starts torchrun slowly
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


def test_2d_layout_on_four_gloo_ranks_matches_the_single_process_run(single_process, tmp_path):
    """PertP 2 x DP 2: ranks (dp index, sign) each run one forward of half the batch; 4 losses meet."""
    ref_log, ref_state = single_process
    out = str(tmp_path / "run")
    torchrun([str(HERE / "distzo_worker.py"), "train", "2", out], nproc=4)
    logs = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(4)]
    assert all(r["log"] == logs[0]["log"] for r in logs)  # one trajectory on every rank
    assert all(r["scalars_sent"] == 3 * 1 + 4 for r in logs)  # one loss per rank and step, 4 checksums
    # the DP bound of test_two_gloo_ranks_...[dp]: mean of half-batch losses vs the full-batch loss
    dg = [abs(a["coefficients"][0][1] - b["coefficients"][0][1]) for a, b in zip(ref_log, logs[0]["log"])]
    assert max(dg) < 1e-4
    state = torch.load(out + ".pt")
    for n, t in ref_state.items():
        assert (t - state[n]).abs().max().item() <= 1e-2 * sum(dg) * 6 + 1e-7, n


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


@pytest.mark.parametrize("pp,gather", [(2, "into_tensor"), (1, "list")], ids=["pertp", "dp"])
def test_sliced_uploads_on_two_gloo_ranks_end_with_the_single_process_weights_at_half_the_upload_bytes(
    single_process, tmp_path, pp, gather
):
    ref_log, ref_state = single_process
    out = str(tmp_path / "run")
    torchrun([str(HERE / "distzo_worker.py"), "offload", str(pp), out, gather])
    r0, r1 = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1))
    whole, sliced = torch.load(out + ".whole.pt"), torch.load(out + ".sliced.pt")
    for r in (r0, r1):
        assert r["sliced"]["sliced"] and not r["whole"]["sliced"]
        assert r["sliced"]["into_tensor"] is (gather == "into_tensor")
        assert r["sliced"]["log"] == r["whole"]["log"] == r0["whole"]["log"]  # every rank, both upload schemes
    for n, t in whole.items():
        assert torch.equal(t, sliced[n]), n  # slicing changes where bytes travel, not a single bit
    if pp == 2:  # as without offload: bit-identical to one process
        assert r0["sliced"]["log"] == ref_log
        for n, t in ref_state.items():
            assert torch.equal(t, sliced[n]), n
    else:  # DP: the half-batch losses round differently (see the test above), within the same bound
        dg = [abs(a["coefficients"][0][1] - b["coefficients"][0][1]) for a, b in zip(ref_log, r0["sliced"]["log"])]
        for n, t in ref_state.items():
            assert (t - sliced[n]).abs().max().item() <= 1e-2 * sum(dg) * 6 + 1e-7, n
    # Each rank copied half of every block to the compute device, the other half came from its partner.
    # One fp32 group per block here; an odd block splits into slices one element apart.
    for r in (r0, r1):
        w, s = r["whole"], r["sliced"]
        assert s["uploads"] == w["uploads"] > 0 and s["stored_bytes"] == w["stored_bytes"]
        assert abs(w["uploaded_bytes"] / 2 - s["uploaded_bytes"]) <= 4 * s["uploads"]
    assert r0["sliced"]["uploaded_bytes"] + r1["sliced"]["uploaded_bytes"] == r0["whole"]["uploaded_bytes"]


def test_ranks_whose_offload_prefetch_differs_are_refused_before_any_sliced_upload(tmp_path):
    out = str(tmp_path / "mismatch")
    torchrun([str(HERE / "distzo_worker.py"), "mismatch", "1", out])
    for r in (0, 1):
        msg = json.loads(Path(f"{out}.{r}.json").read_text())["raised"]
        assert msg and msg.startswith("offload: the ranks' transformer blocks or offload.prefetch differ")


def test_sliced_upload_true_in_one_process_is_refused_in_one_line():
    from distzo_worker import tiny as tiny_llama

    from zoft.zo.offload import OffloadConfig, attach_offload

    with pytest.raises(ZoftError, match=r"^offload.sliced_upload: true needs several processes sharing the uploads, "
                                        r"but this run has 1; launch it with torchrun"):
        attach_offload(tiny_llama(), OffloadConfig(compute_device="cpu", sliced_upload=True))
    assert not attach_offload(tiny_llama(), OffloadConfig(compute_device="cpu")).sliced  # auto: off in one process


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


def _pertp_recipe(model_dir, data, out, offload, **sections):
    from conftest import tiny_recipe

    return tiny_recipe(model_dir, data, out, train={"save_strategy": "no", "max_steps": 3}, offload=offload,
                       **sections)


def _one_process_pertp_trainer(model_dir, data, tmp_path, offload):
    """The reference, built but not trained: a 1-process DistZO with the PertP-ordered sampler's layout."""
    from zoft import run
    from zoft.config import validate_recipe

    recipe = validate_recipe(_pertp_recipe(model_dir, data, tmp_path / "one", offload,
                                           distributed={"perturbation_parallel": 1}))
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer._get_train_sampler = lambda *a, **k: PertPSampler(len(trainer.train_dataset), 4, 1, 7)
    return trainer


def _two_rank_pertp_run(model_dir, data, tmp_path, offload, *worker_args):
    """The same recipe with PertP on 2 ranks under torchrun (tests/distzo_trainer_worker.py); rank 0's weights."""
    path = tmp_path / "pertp.json"
    path.write_text(json.dumps(_pertp_recipe(model_dir, data, str(tmp_path / "two"), offload,
                                             distributed={"perturbation_parallel": 2, "checksum_steps": 1})))
    torchrun([str(HERE / "distzo_trainer_worker.py"), str(path), str(tmp_path / "two.pt"), *worker_args])
    return torch.load(tmp_path / "two.pt")


@pytest.mark.parametrize("offload", [None, {"device": "cpu", "storage_dtype": "bfloat16"}], ids=["memory", "zo2-bf16"])
def test_recipe_with_pertp_under_torchrun_trains_exactly_like_one_process(tiny_llama_dir, sentiment_csv, tmp_path,
                                                                          offload):
    """With offload: bf16 storage, and on 2 ranks sliced uploads (auto), against one process without slicing."""
    trainer = _one_process_pertp_trainer(tiny_llama_dir, sentiment_csv, tmp_path, offload)
    trainer.train()
    two = _two_rank_pertp_run(tiny_llama_dir, sentiment_csv, tmp_path, offload)
    from zoft.zo.trajectory import read_trajectory

    assert read_trajectory(tmp_path / "one" / "trajectory.jsonl")[1] == read_trajectory(
        tmp_path / "two" / "trajectory.jsonl")[1]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), two[n]), n
    if offload is not None:
        info = json.loads((tmp_path / "two.pt.json").read_text())
        assert info["sliced"] and info["stored_dtypes"] == ["torch.bfloat16"]
        assert not trainer.offloader.sliced
        # half of one process's bytes per upload (PertP: each rank runs half the forwards, so compare per upload)
        per_upload = trainer.offloader.uploaded_bytes / trainer.offloader.uploads
        assert abs(info["uploaded_bytes"] / info["uploads"] - per_upload / 2) <= 2


def test_offloaded_model_with_the_gpu_device_map_trains_evaluates_and_saves_on_two_ranks(tiny_llama_dir, sentiment_csv,
                                                                                         tmp_path):
    """On GPUs the offloader gives the model a two-entry hf_device_map, which accelerate refuses to prepare in
    distributed mode ("You can't train a model that has been loaded with device_map='auto'..."). DistZO2
    exchanges scalars only, so the trainer must not hand the model to accelerate's DDP: the run trains,
    evaluates and saves, and ends with the weights of one process."""
    from safetensors.torch import load_file

    trainer = _one_process_pertp_trainer(tiny_llama_dir, sentiment_csv, tmp_path, {"device": "cpu"})
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    two = _two_rank_pertp_run(tiny_llama_dir, sentiment_csv, tmp_path, {"device": "cpu"}, "gpu-map")
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), two[n]), n
    losses = json.loads((tmp_path / "two.pt.eval.json").read_text())
    assert losses == pytest.approx({"before": before, "after": after}, rel=1e-6)
    assert after != before
    saved = load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(saved[n], two[n]) for n in saved if n in two) and len(set(saved) & set(two)) > 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_with_nccl_run_an_offloaded_pertp_recipe_like_one_gpu(tiny_llama_dir, sentiment_csv, tmp_path):
    """The GPU form of the device-map test above: NCCL, blocks in pinned CPU memory, sliced uploads."""
    trainer = _one_process_pertp_trainer(tiny_llama_dir, sentiment_csv, tmp_path, {"device": "cpu"})
    trainer.train()
    two = _two_rank_pertp_run(tiny_llama_dir, sentiment_csv, tmp_path, {"device": "cpu"})
    info = json.loads((tmp_path / "two.pt.json").read_text())
    assert info["sliced"]
    for n, p in trainer.model.named_parameters():
        assert torch.allclose(p.detach().cpu(), two[n].cpu(), atol=1e-5), n
