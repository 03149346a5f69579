"""The philox z generator on the training path: z from the kernels' Philox stream, fused ZO2 update+perturb.

CPU tests use the plain-torch reference backend; the Triton kernels run in a subprocess under
TRITON_INTERPRET=1 (tests/zo_philox_interpret_worker.py); the gpu-marked test runs them on CUDA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, train_recipe, train_until_killed
from test_mezo_trainer import _weights
from test_offload import batches, tiny
from test_perturb import Quadratic, TwoLayer

from zoft import checkpoints, run
from zoft.config import validate_recipe
from zoft.errors import ZoftError
from zoft.kernels import zo_reference as R
from zoft.zo.estimate import DirectionEstimate, spsa
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer
from zoft.zo.perturb import ZOParameters, derive_seed, resolve_z_generator
from zoft.zo.trajectory import read_trajectory, recorded_z_generator, replay_updates

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.delenv("ZOFT_ZO_KERNEL", raising=False)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_philox_z_of_a_parameter_is_the_reference_stream_of_its_seed(distribution):
    zo = ZOParameters(TwoLayer(), run_seed=3, distribution=distribution, z_generator="philox")
    assert zo.z_generator == "philox"
    for name, p in zo.params.items():
        seed = derive_seed(3, 5, 1, name)
        expected = R.philox_z(seed, p.numel(), rademacher=distribution == "rademacher").view(p.shape)
        assert torch.equal(zo.z(name, 5, 1), expected), name
    # The perturbed temporary is w + scale z, from the fused perturbed_copy (no z tensor in between).
    name = "first.weight"
    w = zo.params[name].detach().clone()
    got = zo.perturbed_value(name, 5, 1, 0.5)
    assert torch.equal(got, R.perturbed_copy(w, derive_seed(3, 5, 1, name), 0.5,
                                             rademacher=distribution == "rademacher"))
    assert torch.equal(got, w + zo.z(name, 5, 1) * torch.tensor(0.5))


def test_auto_picks_philox_where_training_computes_on_cuda():
    assert resolve_z_generator("auto", on_cuda=False) == "torch"
    assert resolve_z_generator("auto", on_cuda=True) == "philox"
    assert resolve_z_generator("torch", on_cuda=True) == "torch"
    assert ZOParameters(TwoLayer(), 0, z_generator="auto").z_generator == "torch"
    # ZO2: blocks stored on CPU but computed on CUDA (no CUDA tensor is made for this).
    assert ZOParameters(TwoLayer(), 0, z_generator="auto", compute_device="cuda").z_generator == "philox"
    with pytest.raises(ZoftError, match="auto, torch, philox"):
        ZOParameters(TwoLayer(), 0, z_generator="numpy")


def test_philox_update_is_the_reference_formula_exactly_over_more_directions_than_one_kernel_call():
    model = TwoLayer()
    zo = ZOParameters(model, run_seed=4, z_generator="philox")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.01
    coefficients = [(k, 0.3 * (k + 1) * (-1) ** k) for k in range(6)]  # 6 directions: kernel calls of 4 + 2
    zo.apply_update(step=7, coefficients=coefficients, lr=lr, weight_decay=wd)
    for n, p in model.named_parameters():
        decay = 0.0 if (n.endswith("bias") or n.startswith("norm")) else wd
        # fp32 in the kernel's order: w * (1 - lr wd), then each lr c_k z_k subtracted.
        expected = before[n] * torch.tensor(1 - lr * decay)
        for k, c in coefficients:
            expected = expected - zo.z(n, 7, k) * torch.tensor(lr * c)
        assert torch.equal(p, expected), n


def test_philox_spsa_projected_gradient_is_the_directional_derivative_and_averages_to_the_gradient():
    # float64 parameters: not a kernel dtype, so z is materialized from the same Philox stream.
    model = Quadratic()
    zo = ZOParameters(model, run_seed=1, master_weights="none", z_generator="philox")
    eps, n = 1e-3, 3000
    total = torch.zeros_like(model.theta)
    for step in range(n):
        (est,) = spsa(zo, model, step=step, eps=eps)
        z = zo.z("theta", step, 0).to(torch.float64)
        assert est.projected_grad == pytest.approx(float(z @ model.grad()), rel=1e-6, abs=1e-6)
        total += est.projected_grad * z
    true = model.grad()
    assert torch.linalg.norm(total / n - true) / torch.linalg.norm(true) < 0.12


def test_philox_mezo_minimizes_an_fp32_quadratic_through_the_kernel_path():
    model = Quadratic(d=8).float()
    zo = ZOParameters(model, run_seed=2, z_generator="philox")
    assert not zo.masters  # fp32: the perturbation and update go through perturbed_copy / fused_update_perturb
    opt = MeZOOptimizer(zo, lr=1e-2)
    a, b = model.A.double(), model.b.double()
    f_min = float(-0.5 * b @ torch.linalg.solve(a, b))
    start = float(model().detach())
    for step in range(300):
        for est in spsa(zo, model, step=step, eps=1e-3):
            opt.record(step, est)
        opt.step()
    # 300 ZO-SGD steps close at least 95% of the gap to the minimum (about 99.8% here).
    assert float(model().detach()) - f_min < 0.05 * (start - f_min)


@torch.no_grad()
def _run(model, data, zo_kwargs, *, offload=False, fuse=True, wd=0.1, lr=1e-2):
    """3 MeZO steps written out (not spsa) to count the weight passes of each step's first forward."""
    zo = ZOParameters(model, run_seed=3, **zo_kwargs)
    log = []
    if offload:
        opt = DeferredMeZOOptimizer(zo, lr=lr, weight_decay=wd, on_update=log.append,
                                    offloader=BlockOffloader(model, "cpu", "cpu"), fuse=fuse)
    else:
        opt = MeZOOptimizer(zo, lr=lr, weight_decay=wd, on_update=log.append)
    first_forward_passes = []
    for step, ids in enumerate(data):
        before = zo.weight_passes
        with zo.perturbed(step, 0, 1e-2):
            loss_plus = float(model(input_ids=ids, labels=ids).loss)
        first_forward_passes.append(zo.weight_passes - before)
        with zo.perturbed(step, 0, -1e-2):
            loss_minus = float(model(input_ids=ids, labels=ids).loss)
        opt.record(step, DirectionEstimate(0, (loss_plus - loss_minus) / 2e-2, loss_plus, loss_minus))
        opt.step()
    opt.flush()
    return zo, opt, log, first_forward_passes


@pytest.mark.parametrize("dtype,master", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "fp32")])
def test_fused_deferred_update_gives_the_weights_of_unfused_and_of_in_memory_mezo_in_one_pass(dtype, master):
    data = batches(3)
    philox = {"z_generator": "philox", "master_weights": master}
    models = {k: tiny("llama").to(dtype) for k in ("eager", "unfused", "fused")}
    eager = _run(models["eager"], data, philox)
    unfused = _run(models["unfused"], data, philox, offload=True, fuse=False)
    fused = _run(models["fused"], data, philox, offload=True, fuse=True)
    assert eager[2] == unfused[2] == fused[2]  # the same losses, projected gradients, lr
    for name, a in models["eager"].state_dict().items():
        assert torch.equal(a, models["unfused"].state_dict()[name]), name
        assert torch.equal(a, models["fused"].state_dict()[name]), name
    for name, m in eager[0].masters.items():
        assert torch.equal(m, fused[0].masters[name]) and torch.equal(m, unfused[0].masters[name]), name
    n = len(fused[0].params)
    assert fused[1].applied_in_forward == unfused[1].applied_in_forward == 2 * n
    # Step 0 has no pending update: one perturbed_copy pass per parameter. At steps 1 and 2 the first
    # forward also applies the previous update: one fused pass (+1 master -> bf16 copy with fp32 masters;
    # by default the kernel rounds the bf16 weight in place) instead of two.
    assert bool(fused[0].masters) == (master == "fp32")
    sync = 1 if master == "fp32" else 0
    assert fused[3] == [n, (1 + sync) * n, (1 + sync) * n]
    assert unfused[3] == [n, (2 + sync) * n, (2 + sync) * n]
    assert fused[0].weight_passes < unfused[0].weight_passes == eager[0].weight_passes


def test_torch_generator_deferred_update_is_unfused_and_unchanged():
    data = batches(2)
    a, b = tiny("llama"), tiny("llama")
    ref = _run(a, data, {}, wd=0.0)
    off = _run(b, data, {}, offload=True, wd=0.0)
    assert off[3] == [len(off[0].params), 2 * len(off[0].params)]  # the update is its own pass with torch z
    assert ref[2] == off[2]
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


def test_triton_kernels_in_training_match_the_reference_under_the_interpreter(tmp_path):
    path = tmp_path / "philox_runs.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "zo_philox_interpret_worker.py"), str(path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = torch.load(path)
    # Rademacher (bf16 weights, stochastic rounding with Philox bits, no masters): Philox words are
    # bit-exact, so is the whole run, two-forward and paired (whose fused pass writes both copies).
    for kind in ("rademacher", "paired"):
        tri, ref = runs[kind]["triton"], runs[kind]["torch"]
        assert tri["log"] == ref["log"], kind
        assert not tri["masters"] and not ref["masters"]
        for name, t in ref["state"].items():
            assert torch.equal(tri["state"][name], t), (kind, name)
    assert runs["paired"]["triton"]["applied_in_forward"] == runs["paired"]["triton"]["n_params"]  # step 1, fused
    # Gaussian (fp32): z agrees to a few ulp (Box-Muller's log/cos/sin), so the run does too.
    tri, ref = runs["gaussian"]["triton"], runs["gaussian"]["torch"]
    for a, b in zip(tri["log"], ref["log"]):
        assert a["coefficients"][0][1] == pytest.approx(b["coefficients"][0][1], rel=1e-4, abs=1e-5)
    # The weights then differ by at most lr * |delta c| * max|z| per step (|z| < 5.7), plus the z ulps.
    bound = 1e-6 + sum(a["lr"] * abs(a["coefficients"][0][1] - b["coefficients"][0][1]) * 5.7
                       for a, b in zip(tri["log"], ref["log"]))
    for name, t in ref["state"].items():
        torch.testing.assert_close(tri["state"][name], t, rtol=0, atol=bound)
    # The Triton run was offloaded with the fused update: one pass fewer per parameter per update.
    n = tri["n_params"]
    assert ref["passes"] - tri["passes"] == n


# -- through the recipe, resume and replay ------------------------------------------------------------


def test_recipe_philox_trains_resumes_and_replays_bit_for_bit(tiny_llama_dir, sentiment_csv, tmp_path):
    settings = {"train": {"max_steps": 6, "save_steps": 2}, "method": {"z_generator": "philox"}}
    straight = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "straight", **settings))
    run.train(straight)
    header, records = read_trajectory(tmp_path / "straight" / "trajectory.jsonl")
    assert header["z_generator"] == "philox" and len(records) == 6

    killed = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "killed", **settings))
    trainer = train_until_killed(killed, 5)
    del trainer
    assert checkpoints.latest_complete_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    # An explicit other generator would draw other directions than the logged ones: refused.
    wrong = killed.model_copy(update={"output": killed.output.model_copy(update={"resume": True}),
                                      "method": killed.method.model_copy(update={"z_generator": "torch"})})
    with pytest.raises(ZoftError, match="method.z_generator: the checkpoint was trained with 'philox'"):
        run.train(wrong)
    # auto (torch on this CPU) follows the checkpoint's philox.
    resumed = wrong.model_copy(update={"method": killed.method.model_copy(update={"z_generator": "auto"})})
    run.train(resumed)

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_trajectory(tmp_path / "killed" / "trajectory.jsonl")[1] == records

    assert run.replay(str(tmp_path / "straight"), str(tmp_path / "rebuilt")) == 6
    c = _weights(tmp_path / "rebuilt")
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_replay_uses_the_recorded_generator_and_old_logs_mean_torch(tiny_llama_dir, sentiment_csv, tmp_path):
    assert recorded_z_generator({"run_seed": 1}) == "torch"
    run.train(validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "run",
                                          method={"z_generator": "torch"}, train={"save_strategy": "no"})))
    log = tmp_path / "run" / "trajectory.jsonl"
    header, records = read_trajectory(log)
    assert header["z_generator"] == "torch"
    del header["z_generator"]  # a trajectory written before the field existed
    log.write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    assert run.replay(str(tmp_path / "run"), str(tmp_path / "rebuilt")) == 4
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "rebuilt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_replay_refuses_a_torch_generator_run_from_another_device_in_one_line(tiny_llama_dir, sentiment_csv, tmp_path):
    for gen in ("torch", "philox"):
        run.train(validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / gen, model={"dtype": "bfloat16"},
                                              method={"z_generator": gen}, train={"save_strategy": "no"})))
        log = tmp_path / gen / "trajectory.jsonl"
        header, records = read_trajectory(log)
        assert header["rng_device"] == "cpu"
        header["rng_device"] = "cuda"  # as a CUDA run records it
        log.write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    with pytest.raises(ZoftError, match=r"^trajectory: the run drew z and rounding bits with torch.Generator on cuda, "
                                        r"whose numbers differ on cpu, so replay here would rebuild other weights; "
                                        r"replay on a cuda machine, or train with method.z_generator: philox \(the same "
                                        r"numbers on every device\)$"):
        run.replay(str(tmp_path / "torch"), str(tmp_path / "rebuilt-torch"))
    # philox z and rounding bits are the same numbers on every device: replayed here, bit for bit.
    assert run.replay(str(tmp_path / "philox"), str(tmp_path / "rebuilt-philox")) == 4
    a, b = _weights(tmp_path / "philox"), _weights(tmp_path / "rebuilt-philox")
    assert a["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_recipe_offload_with_philox_trains_exactly_like_the_in_memory_recipe(tiny_llama_dir, sentiment_csv, tmp_path):
    # Two forwards per step (the paired forward is offload's default: see the next test).
    method = {"z_generator": "philox", "paired_forward": False}
    plain = train_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "plain", method=method,
                               train={"save_strategy": "no"}))
    off = train_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "off", method=method,
                             offload={"device": "cpu"}, train={"save_strategy": "no"}))
    opt = off.zo_optimizer
    assert isinstance(opt, DeferredMeZOOptimizer) and opt.fuse and opt.zo.z_generator == "philox"
    assert opt.applied_in_forward == 3 * len(opt.zo.params)  # steps 1-3 fused into their first forward
    assert off.zo_params.weight_passes < plain.zo_params.weight_passes
    ta = read_trajectory(tmp_path / "plain" / "trajectory.jsonl")[1]
    assert ta == read_trajectory(tmp_path / "off" / "trajectory.jsonl")[1]
    for (n, a), b in zip(plain.model.state_dict().items(), off.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_recipe_offload_paired_with_philox_trains_exactly_like_the_in_memory_paired_recipe(
    tiny_llama_dir, sentiment_csv, tmp_path
):
    plain = train_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "plain",
                               method={"z_generator": "philox", "paired_forward": True}, train={"save_strategy": "no"}))
    off = train_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "off", method={"z_generator": "philox"},
                             offload={"device": "cpu"}, train={"save_strategy": "no"}))
    assert off.zo_params.z_generator == "philox"
    ta = read_trajectory(tmp_path / "plain" / "trajectory.jsonl")[1]
    assert ta == read_trajectory(tmp_path / "off" / "trajectory.jsonl")[1]
    for (n, a), b in zip(plain.model.state_dict().items(), off.model.state_dict().values()):
        assert torch.equal(a, b), n
    # The fused pass runs under the paired forward: steps 1-3 apply the previous update and write both
    # perturbed copies in one pass per tensor. 4 steps: 1 (step 0's pair) + 3 x 1 + 1 (the final flush) passes
    # per tensor, where the fused two-forward run takes 2 + 3 x 2 + 1 and the unfused paired one 2 + 3 x 3 + 1.
    n = len(off.zo_params.params)
    assert off.zo_params.weight_passes == 5 * n
    assert off.zo_optimizer.applied_in_forward == 3 * n


# -- CUDA: the real kernels (skipped without a GPU) -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_gpu_offload_philox_fused_matches_the_cpu_reference_and_replays_on_cpu(distribution):
    data = batches(3)
    cpu_model, gpu_model = tiny("llama"), tiny("llama")
    cpu = _run(cpu_model, data, {"z_generator": "philox", "distribution": distribution})
    zo = ZOParameters(gpu_model, run_seed=3, distribution=distribution, z_generator="auto", compute_device="cuda")
    assert zo.z_generator == "philox"
    offloader = BlockOffloader(gpu_model, "cuda", "cpu")
    log = []
    opt = DeferredMeZOOptimizer(zo, lr=1e-2, weight_decay=0.1, on_update=log.append, offloader=offloader)
    for step, ids in enumerate(data):
        ids = ids.cuda()
        for e in spsa(zo, lambda ids=ids: gpu_model(input_ids=ids, labels=ids).loss, step=step, eps=1e-2):
            opt.record(step, e)
        opt.step()
    opt.flush()
    n = len(zo.params)
    assert opt.applied_in_forward == 2 * n
    # Fused on CUDA: 2 passes at step 0, 1 + 1 at steps 1 and 2 (update fused into +eps), 1 for the flush.
    assert zo.weight_passes == 7 * n
    for r, o in zip(cpu[2], log):  # CUDA and CPU matmuls round differently: the losses agree closely
        assert r["coefficients"][0][1] == pytest.approx(o["coefficients"][0][1], rel=1e-3, abs=1e-3)
    gpu_state = {n: t.cpu() for n, t in gpu_model.state_dict().items()}
    for name, a in cpu_model.state_dict().items():
        torch.testing.assert_close(gpu_state[name], a, rtol=0, atol=1e-4)
    # The CUDA run's scalar log rebuilds its weights on CPU with the reference Philox (few-ulp z).
    rebuilt = tiny("llama")
    header = {"trained": {}}
    replay_updates(ZOParameters(rebuilt, 3, distribution=distribution, z_generator="philox"), header, log)
    for name, a in rebuilt.state_dict().items():
        torch.testing.assert_close(a, gpu_state[name], rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_gpu_bf16_offload_paired_fused_rounds_like_the_cpu_reference_and_writes_back(distribution):
    from zoft.zo.estimate import paired_spsa
    from zoft.zo.paired import double_batch

    data = batches(3)

    def train(model, device, offload):
        zo = ZOParameters(model, run_seed=3, distribution=distribution, z_generator="philox",
                          compute_device=device if offload else None)
        assert zo.masters == {}  # bf16 without fp32 copies
        offloader = BlockOffloader(model, device, "cpu") if offload else None
        log = []
        opt = (DeferredMeZOOptimizer(zo, lr=1e-2, weight_decay=0.1, on_update=log.append, offloader=offloader)
               if offload else MeZOOptimizer(zo, lr=1e-2, weight_decay=0.1, on_update=log.append))
        for step, ids in enumerate(data):
            ids = ids.to(device)

            def pair(ids=ids):
                logits = model(**double_batch({"input_ids": ids}, 2)).logits.float()
                return tuple(model.loss_function(logits=h, labels=ids, vocab_size=model.config.vocab_size)
                             for h in (logits[:2], logits[2:]))

            for e in paired_spsa(zo, pair, 2, step=step, eps=1e-2, seq_len=ids.shape[1]):
                opt.record(step, e)
            opt.step()
        opt.flush()
        return zo, opt, log, offloader

    cpu_model = tiny("llama").to(torch.bfloat16)
    gpu_model = tiny("llama").to(torch.bfloat16)
    cpu = train(cpu_model, "cpu", offload=False)
    zo, opt, log, offloader = train(gpu_model, "cuda", offload=True)
    n = len(zo.params)
    assert opt.applied_in_forward == 2 * n  # steps 1 and 2: the update taken by the pair's one pass
    assert zo.weight_passes == (1 + 2 + 1) * n  # step 0's pair, two fused passes, the final flush
    offloader.synchronize()
    # The write-back stream delivered every block: what is stored is what the module holds between steps.
    for name, p in gpu_model.named_parameters():
        assert p.dtype == torch.bfloat16, name
    for r, o in zip(cpu[2], log):
        assert r["coefficients"][0][1] == pytest.approx(o["coefficients"][0][1], rel=2e-2, abs=2e-2)
    # Same z and rounding bits (philox) on both devices; bf16 forwards on CUDA and CPU differ, so the
    # projected gradients do too: the weights agree to about a bf16 spacing.
    gpu_state = {k: v.cpu().float() for k, v in gpu_model.state_dict().items()}
    for k, v in cpu_model.state_dict().items():
        torch.testing.assert_close(gpu_state[k], v.float(), rtol=2**-6, atol=1e-3)
    # The CUDA run's scalar log replays on CPU (philox z and rounding bits are device-independent).
    rebuilt = tiny("llama").to(torch.bfloat16)
    replay_updates(ZOParameters(rebuilt, 3, distribution=distribution, z_generator="philox"),
                   {"z_generator": "philox", "rng_device": "cuda"}, log)
    for k, v in rebuilt.state_dict().items():
        same = (v.float() == gpu_state[k]).float().mean().item()
        assert same > (0.999 if distribution == "rademacher" else 0.99), (k, same)


def test_torch_z_with_cpu_masters_of_blocks_computing_on_cuda_is_refused_in_one_line():
    # Constructed without a GPU: only the compute device named, the masters are where the model is (CPU).
    model = tiny("llama").to(torch.bfloat16)
    with pytest.raises(ZoftError, match=r"^method.z_generator: torch with offload to CUDA and fp32 master weights"):
        ZOParameters(model, run_seed=1, z_generator="torch", compute_device="cuda", master_weights="fp32")
    # The default keeps no masters: the update runs where the block computes, with z drawn there.
    assert ZOParameters(model, run_seed=1, z_generator="torch", compute_device="cuda").masters == {}
    assert ZOParameters(model, run_seed=1, z_generator="auto", compute_device="cuda").z_generator == "philox"
    assert ZOParameters(tiny("llama"), run_seed=1, z_generator="torch", compute_device="cuda").masters == {}
