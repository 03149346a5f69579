"""The paired forward: one forward of [x; x] gives exactly the two-forward SPSA estimate, with offloading
uploads each block once per step, and samples z twice per step (pair + update)."""

import pytest
import torch
from conftest import tiny_recipe
from test_offload import VOCAB, tiny
from torch import nn

from zoft import run
from zoft.config import validate_recipe
from zoft.errors import RecipeError
from zoft.zo.estimate import paired_spsa, spsa
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer
from zoft.zo.paired import double_batch, paired_perturbation
from zoft.zo.perturb import ZOParameters
from zoft.zo.trajectory import read_trajectory

EPS = 1e-2


def lora_llama():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    # init_lora_weights=False: B != 0, so the adapters change the function from step 0.
    return get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def build(arch):
    return lora_llama() if arch == "lora" else tiny(arch)


def causal_lm_batch(seed=1, rows=3, width=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # a right-padded row: the padded positions are ignored by the loss
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_loss(model, logits, labels):
    # The model's own causal-LM loss (what model(..., labels=labels).loss computes), on given logits.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.loss_function(logits=logits, labels=labels, vocab_size=base.config.vocab_size)


def pair_loss_fn(model, batch):
    """(L+, L-) from one forward of the doubled batch: each half scored against the undoubled labels."""
    n = batch["input_ids"].shape[0]

    def fn():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**double_batch(inputs, n)).logits
        return hf_loss(model, logits[:n], batch["labels"]), hf_loss(model, logits[n:], batch["labels"])

    return fn


def paired(zo, model, batch, step, n_directions=1):
    ids = batch["input_ids"]
    return paired_spsa(zo, pair_loss_fn(model, batch), ids.shape[0], step=step, eps=EPS,
                       n_directions=n_directions, seq_len=ids.shape[1])


def test_paired_estimate_with_philox_z_equals_the_two_forward_philox_estimate():
    # With the device-independent Philox z (zoft/kernels) the pair is two perturbed copies from the kernels'
    # backend, rounded exactly like the two-forward path.
    model = tiny("llama")
    zo = ZOParameters(model, run_seed=3, z_generator="philox")
    batch = causal_lm_batch()
    ref = spsa(zo, lambda: model(**batch).loss, step=2, eps=EPS, n_directions=2)
    assert paired(zo, model, batch, step=2, n_directions=2) == ref
    torch_zo = ZOParameters(model, run_seed=3, z_generator="torch")
    assert spsa(torch_zo, lambda: model(**batch).loss, step=2, eps=EPS)[0] != ref[0]  # another z


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2", "opt", "lora"])
def test_paired_estimate_equals_the_two_forward_estimate_bit_for_bit(arch):
    model = build(arch)
    zo = ZOParameters(model, run_seed=3)
    batch = causal_lm_batch()
    ref = spsa(zo, lambda: model(**batch).loss, step=4, eps=EPS, n_directions=2)
    got = paired(zo, model, batch, step=4, n_directions=2)
    # Exact on CPU fp32: every module with trained weights computes exactly its undoubled half, and what
    # runs on the doubled batch (attention, norms, the frozen base weights under LoRA) treats each row alike
    # whatever the batch size here. A GPU may pick other kernels for a doubled batch (then ~1e-6 relative).
    assert got == ref
    assert ref[0].loss_plus != ref[0].loss_minus  # the two halves did see different weights
    fresh = build(arch).state_dict()
    for name, t in model.state_dict().items():  # and nothing stored was changed
        assert torch.equal(t, fresh[name]), name


def test_tied_embedding_and_head_see_one_z_per_half_and_forwards_are_restored():
    model = tiny("llama")  # tie_word_embeddings=True
    emb, head = model.model.embed_tokens, model.lm_head
    assert emb.weight is head.weight
    zo = ZOParameters(model, run_seed=0)
    seen = {"emb": [], "head": []}

    def capturing(module, key):
        inner = module.forward  # an instance-level forward (as accelerate's hooks install) the pair wraps

        def forward(*args, **kwargs):
            seen[key].append(module.weight.detach().clone())
            return inner(*args, **kwargs)

        module.forward = forward
        return forward

    f_emb, f_head = capturing(emb, "emb"), capturing(head, "head")
    batch = causal_lm_batch()
    gens = zo.z_generations
    with paired_perturbation(zo, 0, 0, EPS, batch_size=3, seq_len=12):
        model(input_ids=double_batch(batch["input_ids"], 3))
    assert zo.z_generations - gens == len(zo.params)  # one z per parameter for both halves, the tied one once
    (emb_plus, emb_minus), (head_plus, head_minus) = seen["emb"], seen["head"]
    assert torch.equal(emb_plus, head_plus) and torch.equal(emb_minus, head_minus)
    name = "model.embed_tokens.weight"
    assert torch.equal(emb_plus, zo.perturbed_value(name, 0, 0, +EPS))
    assert torch.equal(emb_minus, zo.perturbed_value(name, 0, 0, -EPS))
    assert emb.forward is f_emb and head.forward is f_head  # the wrapped forwards are put back
    assert "forward" not in model.model.layers[0].mlp.up_proj.__dict__  # and the others removed
    assert torch.equal(emb.weight, tiny("llama").model.embed_tokens.weight)  # stored values untouched


def test_forwards_are_restored_when_the_paired_forward_raises():
    model = tiny("llama")
    zo = ZOParameters(model, run_seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(IndexError):
        with paired_perturbation(zo, 0, 0, EPS, batch_size=2):
            model(input_ids=torch.full((4, 5), VOCAB + 3))  # an id outside the vocabulary
    assert not any("forward" in m.__dict__ for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


class Mixer(nn.Module):
    """Owns a trained weight and mixes the samples of its batch (as a capacity-limited router would)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (x * self.scale).sum(0)  # one row for the whole batch


def test_a_module_output_that_is_not_per_sample_is_refused_not_mixed():
    model = Mixer()
    zo = ZOParameters(model, run_seed=0)
    with pytest.raises(ValueError, match=r"^paired forward: Mixer returned a tensor of shape \(3,\) per half"):
        with paired_perturbation(zo, 0, 0, EPS, batch_size=2):
            model(torch.ones(4, 3))


# -- offload, the deferred update, and the cost counts --------------------------------------------------------


def run_paired(model, data, *, offload=False, deferred=False, paired_forward=True, wd=0.1):
    zo = ZOParameters(model, run_seed=3)
    offloader = BlockOffloader(model, "cpu", "cpu") if offload else None
    log, uploads, z_per_step = [], [], []
    cls = DeferredMeZOOptimizer if deferred else MeZOOptimizer
    opt = cls(zo, lr=1e-2, weight_decay=wd, on_update=log.append, **({"offloader": offloader} if deferred else {}))
    for step, batch in enumerate(data):
        gens, up = zo.z_generations, offloader.uploads if offloader else 0
        if paired_forward:
            estimates = paired(zo, model, batch, step)
        else:
            estimates = spsa(zo, lambda batch=batch: model(**batch).loss, step=step, eps=EPS)
        for e in estimates:
            opt.record(step, e)
        opt.step()
        z_per_step.append(zo.z_generations - gens)
        uploads.append((offloader.uploads if offloader else 0) - up)
    opt.flush()
    return log, opt, offloader, uploads, z_per_step


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2", "opt"])
def test_offloaded_paired_run_matches_in_memory_paired_run_and_uploads_each_block_once_per_step(arch):
    data = [causal_lm_batch(seed) for seed in range(4)]
    ref_model, off_model, two_model = tiny(arch), tiny(arch), tiny(arch)
    ref_log, ref_opt, _, _, ref_z = run_paired(ref_model, data)
    off_log, opt, offloader, uploads, off_z = run_paired(off_model, data, offload=True, deferred=True)
    two_log, _, two_off, two_uploads, two_z = run_paired(two_model, data, offload=True, deferred=True,
                                                         paired_forward=False)
    assert off_log == ref_log  # coefficients, losses, lr: the whole trajectory record
    assert two_log == ref_log  # and the two-forward run's: the paired forward changes no number on CPU
    start = tiny(arch).state_dict()
    moved = 0.0
    for (name, a), b in zip(ref_model.state_dict().items(), off_model.state_dict().values()):
        assert torch.equal(a, b), name
        moved = max(moved, (a - start[name]).abs().max().item())
    assert moved > 1e-4  # the runs did train
    n, params = len(offloader.blocks), len(ref_opt.zo.params)
    # Step 0 uploads block 0 on demand, then every step uploads blocks 1..n-1 ahead of their forward
    # and block 0 again (the wrap-around prefetch) for the next one: n per step, twice that unpaired.
    assert uploads == [n + 1, n, n, n]
    assert two_uploads == [2 * n + 1, 2 * n, 2 * n, 2 * n]
    # The deferred update still lands before the perturbation reads each module: applied in the
    # forward hooks of steps 1-3 (the bit-identity above says before the perturbation read them).
    assert opt.applied_in_forward == 3 * params
    # z samples per step: one per parameter for the pair and one for the update (the deferred run
    # samples step t's update during step t+1's forward) vs one more per parameter without pairing.
    assert ref_z == [2 * params] * 4
    assert off_z == [params] + [2 * params] * 3
    assert two_z == [2 * params] + [3 * params] * 3


def test_paired_run_with_lora_adapters_offloaded_matches_in_memory():
    data = [causal_lm_batch(seed) for seed in range(3)]
    a, b = lora_llama(), lora_llama()
    ref_log, *_ = run_paired(a, data)
    off_log, _, offloader, uploads, _ = run_paired(b, data, offload=True, deferred=True)
    assert off_log == ref_log
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n
    assert uploads[1:] == [len(offloader.blocks)] * 2


def test_distzo_data_parallel_uses_the_paired_estimate_and_pertp_refuses_it():
    from zoft.zo.distributed import DistZO, DistZOConfig

    model = tiny("llama")
    zo = ZOParameters(model, run_seed=3)
    batch = causal_lm_batch()
    dzo = DistZO(DistZOConfig(perturbation_parallel=1, checksum_steps=0), world_size=1, rank=0)
    ref = dzo.spsa(zo, lambda: model(**batch).loss, step=0, eps=EPS)
    sent = dzo.scalars_sent
    got = dzo.paired_spsa(zo, pair_loss_fn(model, batch), 3, step=0, eps=EPS, seq_len=12)
    assert got == ref and dzo.scalars_sent - sent == 2  # the same two losses cross ranks, from one forward
    pertp = DistZO(DistZOConfig(perturbation_parallel=2), world_size=2, rank=0)
    with pytest.raises(ValueError, match="perturbation_parallel 1"):
        pertp.paired_spsa(zo, pair_loss_fn(model, batch), 3, step=0, eps=EPS)


# -- through ZoftTrainer and the recipe --------------------------------------------------------------------------

TEXT = {"format": "text", "template": None, "verbalizers": None}


def _recipe(tiny_llama_dir, sentiment_csv, out, **sections):
    sections["train"] = {"save_strategy": "no", **sections.get("train", {})}
    return validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, out, **sections))


def _train(recipe):
    run._start_run_dir(recipe)  # the run folder with its recipe.yaml, as `zoft train` leaves it
    trainer = run.build_trainer(recipe)
    trainer.train()
    return trainer


def _same_weights(a, b):
    for (n, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), n


def test_recipe_offload_auto_pairs_and_trains_exactly_like_in_memory_paired_and_replays(
    tiny_llama_dir, sentiment_csv, tmp_path
):
    off_recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "off", offload="cpu")
    mem_recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "mem", method={"paired_forward": True})
    plain_recipe = _recipe(tiny_llama_dir, sentiment_csv, tmp_path / "plain")
    assert off_recipe.uses_paired_forward and mem_recipe.uses_paired_forward
    assert not plain_recipe.uses_paired_forward  # auto without offload: two forwards
    off, mem = _train(off_recipe), _train(mem_recipe)
    assert off.zo_config.paired_forward and mem.zo_config.paired_forward
    traj = {k: read_trajectory(tmp_path / k / "trajectory.jsonl")[1] for k in ("off", "mem")}
    assert len(traj["off"]) == 4 and traj["off"] == traj["mem"]
    _same_weights(off, mem)
    blocks = len(off.offloader.blocks)
    # 4 steps, one forward each, + block 0 on demand at step 0, + the final flush of the other blocks.
    assert off.offloader.uploads == 4 * blocks + 1 + (blocks - 1)
    off.save_model(str(tmp_path / "off"))
    assert run.replay(str(tmp_path / "off"), str(tmp_path / "replayed")) == 4  # the log format is unchanged
    from test_mezo_trainer import _weights

    saved, replayed = _weights(tmp_path / "off"), _weights(tmp_path / "replayed")
    for name, t in saved.items():
        assert torch.equal(t, replayed[name]), name


@pytest.mark.parametrize("data", ["text", "multi_token_verbalizer"])
def test_recipe_paired_forward_matches_two_forwards_on_text_and_multi_token_verbalizers(
    tiny_llama_dir, sentiment_csv, tmp_path, data
):
    if data == "text":
        sections = {"data": TEXT}
    else:  # words of several tokens: one row per example and candidate, mean token log-probability
        sections = {"data": {"verbalizers": {"fresh": " great fun", "rotten": " terrible waste"}}}
    two = _train(_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "two", method={"paired_forward": False},
                         **sections))
    one = _train(_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "one", method={"paired_forward": True},
                         **sections))
    batch = next(iter(one.get_train_dataloader()))
    assert ("candidate_mask" in batch) == (data != "text") and ("labels" in batch) == (data == "text")
    ta, tb = (read_trajectory(tmp_path / k / "trajectory.jsonl")[1] for k in ("two", "one"))
    assert len(ta) == 4 and ta == tb
    _same_weights(two, one)


def test_paired_losses_are_the_losses_of_each_half_not_of_the_doubled_batch(tiny_llama_dir, sentiment_csv, tmp_path):
    trainer = run.build_trainer(_recipe(tiny_llama_dir, sentiment_csv, tmp_path, data=TEXT))
    trainer.create_optimizer()
    model, zo = trainer.model.eval(), trainer.zo_params
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows, width = inputs["input_ids"].shape
    with torch.no_grad():
        with paired_perturbation(zo, 2, 0, EPS, rows, width):
            plus, minus = trainer.compute_paired_losses(model, inputs)
        with zo.perturbed(2, 0, +EPS):
            ref_plus = trainer.compute_loss(model, inputs)
        with zo.perturbed(2, 0, -EPS):
            ref_minus = trainer.compute_loss(model, inputs)
    assert torch.equal(plus, ref_plus) and torch.equal(minus, ref_minus)


def test_recipe_distzo_data_parallel_trains_with_the_paired_estimator(tiny_llama_dir, sentiment_csv, tmp_path,
                                                                      monkeypatch):
    from zoft.zo.distributed import DistZO

    calls = []
    original = DistZO.paired_spsa
    monkeypatch.setattr(DistZO, "paired_spsa", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    dist = _train(_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "dist", method={"paired_forward": True},
                          distributed={"perturbation_parallel": 1}))
    plain = _train(_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "plain"))
    assert len(calls) == 4
    _same_weights(dist, plain)


REFUSED = [
    ({"method": {"paired_forward": True}, "distributed": {"perturbation_parallel": 2}},
     "method.paired_forward: true with distributed.perturbation_parallel 2: PertP already runs the +eps and -eps "
     "forwards on two ranks; set one of them off (paired_forward: false or perturbation_parallel: 1)"),
    ({"method": {"name": "addax", "paired_forward": True, "length_threshold": 16}},
     "method.paired_forward: true is not supported with method 'addax' in this version; drop it"),
    ({"method": {"name": "adamw", "paired_forward": True}},
     "method.paired_forward: only used by zeroth-order methods, not 'adamw'"),
    ({"method": {"paired_forward": True}, "privacy": {"method": "dpzero", "clip_bound": 1.0, "noise_multiplier": 1.0}},
     "method.paired_forward: true with privacy is not supported (DPZero scores each example's two forwards itself); "
     "drop it"),
    ({"method": {"paired_forward": True}, "model": {"task": "sequence_classification"}},
     "method.paired_forward: true needs model.task 'causal_lm' (the loss of each half of a 'sequence_classification' "
     "batch is not split); drop it"),
]


@pytest.mark.parametrize("sections,line", REFUSED, ids=["pertp", "addax", "first_order", "privacy", "seq_cls"])
def test_paired_forward_where_it_does_not_apply_is_refused_in_one_line(tmp_path, sections, line):
    with pytest.raises(RecipeError) as e:
        validate_recipe(tiny_recipe("m", "d.csv", tmp_path, **sections))
    assert e.value.lines == [f"recipe: {line}"]


def test_auto_stays_off_where_pairing_does_not_apply(tmp_path):
    pertp = validate_recipe(tiny_recipe("m", "d.csv", tmp_path, offload="cpu",
                                        distributed={"perturbation_parallel": 2}))
    assert not pertp.uses_paired_forward  # PertP + offload: each rank runs one sign already
    off = validate_recipe(tiny_recipe("m", "d.csv", tmp_path, method={"paired_forward": False}, offload="cpu"))
    assert not off.uses_paired_forward


def test_qzo_on_nf4_scales_with_the_paired_forward_matches_two_forwards(tokenizer_dir, sentiment_csv, tmp_path):
    pytest.importorskip("bitsandbytes")
    from conftest import make_tiny_llama
    from test_qzo import _qzo_recipe

    model_dir = make_tiny_llama(tmp_path / "llama64", tokenizer_dir, hidden=64)  # NF4 needs in_features >= 64
    two = _train(_qzo_recipe(model_dir, sentiment_csv, tmp_path / "two", method={"paired_forward": False}))
    one = _train(_qzo_recipe(model_dir, sentiment_csv, tmp_path / "one", method={"paired_forward": True}))
    assert one.zo_config.paired_forward and not two.zo_config.paired_forward
    ta, tb = (read_trajectory(tmp_path / k / "trajectory.jsonl")[1] for k in ("two", "one"))
    assert len(ta) == 4 and ta == tb
    _same_weights(two, one)


@pytest.mark.gpu
def test_cuda_offloaded_paired_run_matches_two_forwards_in_memory_on_cuda():
    data = [{k: v.cuda() for k, v in causal_lm_batch(seed).items()} for seed in range(3)]
    ref_model, off_model = tiny("llama").cuda(), tiny("llama")
    ref_log, *_ = run_paired(ref_model, data, paired_forward=False)
    zo = ZOParameters(off_model, run_seed=3)
    offloader = BlockOffloader(off_model, "cuda", "cpu")
    log = []
    opt = DeferredMeZOOptimizer(zo, lr=1e-2, weight_decay=0.1, on_update=log.append, offloader=offloader)
    for step, batch in enumerate(data):
        before = offloader.uploads
        for e in paired(zo, off_model, batch, step):
            opt.record(step, e)
        opt.step()
        if step:
            assert offloader.uploads - before == len(offloader.blocks)
    opt.flush()
    # A doubled batch may run other CUDA kernels than a single one: equal to float rounding, not bit for bit.
    for r, o in zip(ref_log, log):
        assert r["coefficients"][0][1] == pytest.approx(o["coefficients"][0][1], rel=1e-3, abs=1e-4)
    for (n, a), b in zip(ref_model.state_dict().items(), off_model.state_dict().values()):
        assert torch.allclose(a.cpu(), b.cpu(), atol=1e-5), n
