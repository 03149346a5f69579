"""ZO2 offloading: block streaming + deferred update give exactly the weights of in-memory MeZO."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from zoft.errors import ZoftError
from zoft.zo.estimate import spsa
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer, find_transformer_blocks
from zoft.zo.perturb import ZOParameters

VOCAB = 101


def tiny(arch, seed=0):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    if arch in ("qwen2", "qwen3"):  # qwen2: q/k/v biases; qwen3: q/k norms inside attention
        config, causal_lm = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
        cfg = config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                     tie_word_embeddings=False)
        return causal_lm(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=64)
        return GPT2LMHeadModel(cfg).eval()
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(cfg).eval()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(n)]


def run_mezo(model, data, *, offload=False, deferred=False, wd=0.0, flush=True):
    zo = ZOParameters(model, run_seed=3)
    offloader = BlockOffloader(model, "cpu", "cpu") if offload else None
    log = []
    if deferred:
        opt = DeferredMeZOOptimizer(zo, lr=1e-2, weight_decay=wd, on_update=log.append, offloader=offloader)
    else:
        opt = MeZOOptimizer(zo, lr=1e-2, weight_decay=wd, on_update=log.append)
    for step, ids in enumerate(data):
        for e in spsa(zo, lambda ids=ids: model(input_ids=ids, labels=ids).loss, step=step, eps=1e-2):
            opt.record(step, e)
        opt.step()
    if flush:
        opt.flush()
    return log, opt, offloader


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2", "opt"])
def test_offloaded_deferred_mezo_matches_in_memory_mezo_bit_for_bit(arch):
    data = batches(4)
    ref_model, off_model = tiny(arch), tiny(arch)
    ref_log, _, _ = run_mezo(ref_model, data, wd=0.1)
    off_log, opt, offloader = run_mezo(off_model, data, offload=True, deferred=True, wd=0.1)
    assert [r["coefficients"] for r in off_log] == [r["coefficients"] for r in ref_log]
    assert [r["loss_plus"] + r["loss_minus"] for r in off_log] == [r["loss_plus"] + r["loss_minus"] for r in ref_log]
    moved = 0.0
    start = tiny(arch).state_dict()
    for (name, a), b in zip(ref_model.state_dict().items(), off_model.state_dict().values()):
        assert torch.equal(a, b), name
        moved = max(moved, (a - start[name]).abs().max().item())
    assert moved > 1e-4  # the runs did train
    n = len(offloader.blocks)
    # 4 steps x 2 forwards: every block uploaded once per forward (plus the wrap-around prefetch
    # of block 0 after the last forward), written back once per step (after its first forward,
    # which applied the previous update) and once more by the final flush, which uploads the
    # blocks other than the prefetched block 0.
    assert offloader.uploads == 4 * 2 * n + 1 + (n - 1)
    assert offloader.writebacks == 3 * n + n
    assert opt.applied_in_forward == 3 * len(opt.zo.params)


def test_deferred_update_is_pending_until_the_next_forward_or_flush():
    data = batches(2)
    ref_model, off_model = tiny("llama"), tiny("llama")
    run_mezo(ref_model, data)
    _, opt, offloader = run_mezo(off_model, data, offload=True, deferred=True, flush=False)
    assert opt.has_deferred
    name = "model.layers.1.mlp.down_proj.weight"
    ref, off = ref_model.state_dict()[name], off_model.state_dict()[name]
    assert not torch.equal(ref, off)  # the last update is still pending on the stored block
    opt.flush()  # what ZoftTrainer does before evaluate and save
    assert not opt.has_deferred
    for (n, a), b in zip(ref_model.state_dict().items(), off_model.state_dict().values()):
        assert torch.equal(a, b), n


def test_blocks_compute_on_a_resident_copy_and_are_stored_between_forwards():
    model = tiny("llama")
    offloader = BlockOffloader(model, "cpu", "cpu")
    q = model.model.layers[1].self_attn.q_proj
    stored_ptr = q.weight.data_ptr()
    seen = []
    q.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
    model(input_ids=batches(1)[0])
    assert seen and seen[0] != stored_ptr  # computed on the uploaded copy, not on the stored tensor
    assert q.weight.data_ptr() == stored_ptr  # and put back afterwards
    assert offloader.writebacks == 0  # nothing changed: nothing written back
    assert model.model.embed_tokens.weight.device.type == "cpu"


def test_offload_with_lora_adapters_matches_in_memory_run():
    from peft import LoraConfig, get_peft_model

    def lora():
        torch.manual_seed(5)
        return get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    data = batches(3)
    a, b = lora(), lora()
    ref_log, _, _ = run_mezo(a, data)
    off_log, _, _ = run_mezo(b, data, offload=True, deferred=True)
    assert [r["coefficients"] for r in off_log] == [r["coefficients"] for r in ref_log]
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("arch,expected", [("llama", "model.layers"), ("qwen2", "model.layers"),
                                           ("qwen3", "model.layers"), ("gpt2", "transformer.h"),
                                           ("opt", "model.decoder.layers")])
def test_block_list_is_found_generically(arch, expected):
    name, blocks = find_transformer_blocks(tiny(arch))
    assert name == expected and len(blocks) == 3


def test_a_model_without_a_block_list_is_refused_in_one_line():
    with pytest.raises(ZoftError, match="no list of transformer blocks"):
        find_transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.gpu
def test_cuda_offload_matches_in_memory_mezo_on_cuda():
    data = [d.cuda() for d in batches(3)]
    ref_model, off_model = tiny("llama").cuda(), tiny("llama")
    ref_log, _, _ = run_mezo(ref_model, data)
    zo = ZOParameters(off_model, run_seed=3)
    offloader = BlockOffloader(off_model, "cuda", "cpu")
    assert off_model.model.layers[0].mlp.up_proj.weight.is_pinned()
    log = []
    opt = DeferredMeZOOptimizer(zo, lr=1e-2, on_update=log.append, offloader=offloader)
    for step, ids in enumerate(data):
        for e in spsa(zo, lambda ids=ids: off_model(input_ids=ids, labels=ids).loss, step=step, eps=1e-2):
            opt.record(step, e)
        opt.step()
    opt.flush()
    for r, o in zip(ref_log, log):
        assert r["coefficients"][0][1] == pytest.approx(o["coefficients"][0][1], rel=1e-3, abs=1e-4)
    for (n, a), b in zip(ref_model.state_dict().items(), off_model.state_dict().values()):
        assert torch.allclose(a.cpu(), b.cpu(), atol=1e-5), n


# -- through the recipe and ZoftTrainer -------------------------------------------------------------


def _recipe_run(tiny_llama_dir, sentiment_csv, out, **sections):
    from conftest import tiny_recipe

    from zoft import run
    from zoft.config import validate_recipe

    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, out, train={"save_strategy": "no"},
                                         **sections))
    run.prepare_output_dir(recipe)
    trainer = run.build_trainer(recipe)
    trainer.train()
    return trainer


def test_recipe_with_offload_trains_exactly_like_the_in_memory_recipe(tiny_llama_dir, sentiment_csv, tmp_path):
    from zoft.zo.trajectory import read_trajectory

    plain = _recipe_run(tiny_llama_dir, sentiment_csv, tmp_path / "plain")
    off = _recipe_run(tiny_llama_dir, sentiment_csv, tmp_path / "off", offload={"device": "cpu"})
    assert isinstance(off.zo_optimizer, DeferredMeZOOptimizer)
    # paired_forward auto: the offloaded run pairs its forwards, the plain one runs two; same numbers on CPU.
    assert off.zo_config.paired_forward and not plain.zo_config.paired_forward
    assert not off.zo_optimizer.has_deferred  # train() flushed the last step's update
    ta = read_trajectory(tmp_path / "plain" / "trajectory.jsonl")[1]
    tb = read_trajectory(tmp_path / "off" / "trajectory.jsonl")[1]
    assert len(ta) == 4 and ta == tb
    for (n, a), b in zip(plain.model.state_dict().items(), off.model.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.gpu
def test_cuda_recipe_with_offload_evaluates_trains_and_saves_like_the_in_memory_cuda_recipe(
    tiny_llama_dir, sentiment_csv, tmp_path
):
    """`zoft train` on a GPU with `offload: cpu`: HF's Trainer leaves the CPU blocks where they are (the
    offloader's device map), evaluation and save see the last update, and the result is the in-memory
    CUDA run's (same Philox z; paired vs two forwards and the fused update differ by rounding only)."""
    from conftest import tiny_recipe
    from safetensors.torch import load_file

    from zoft import run
    from zoft.config import validate_recipe
    from zoft.zo.trajectory import read_trajectory

    def train(name, **sections):
        recipe = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / name,
                                             evaluation={"before": True, "after": True}, **sections))
        metrics = run.train(recipe)
        return metrics, load_file(tmp_path / name / "model.safetensors")

    plain, plain_w = train("plain")
    off, off_w = train("off", offload={"device": "cpu"})
    assert read_trajectory(tmp_path / "off" / "trajectory.jsonl")[0]["z_generator"] == "philox"
    for when in ("before", "after"):
        assert off[when]["eval_loss"] == pytest.approx(plain[when]["eval_loss"], abs=1e-4)
    assert off["after"]["eval_loss"] != off["before"]["eval_loss"]
    assert off_w.keys() == plain_w.keys()
    for n, w in plain_w.items():
        assert torch.allclose(off_w[n], w, atol=1e-5), n


def test_offload_with_a_first_order_method_is_refused_in_one_line(tiny_llama_dir, sentiment_csv, tmp_path):
    from conftest import tiny_recipe

    from zoft.config import validate_recipe
    from zoft.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, method="adamw", offload="cpu"))
    assert len(e.value.lines) == 1 and e.value.lines[0].endswith(
        "offload: needs a zeroth-order method (method.name: mezo), not 'adamw'; "
        "drop the offload section for first-order training"
    )


def test_offload_refuses_a_model_larger_than_cpu_memory_and_says_how_much_is_needed():
    from zoft.zo.offload import check_cpu_memory

    check_cpu_memory(10 * 1024**3, 11 * 1024**3)
    with pytest.raises(ZoftError, match=r"^offload: the model needs about 26\.0 GiB of CPU memory for its weights, "
                                        r"only 16\.0 GiB is available; use model.dtype: bfloat16"):
        check_cpu_memory(26 * 1024**3, 16 * 1024**3)
    # DistZO2: every process on the machine holds its own copy
    check_cpu_memory(5 * 1024**3, 11 * 1024**3, processes=2)
    with pytest.raises(ZoftError, match=r"^offload: the 4 processes on this machine each keep the model in CPU "
                                        r"memory: about 4 x 5\.0 = 20\.0 GiB, only 11\.0 GiB is available; "
                                        r"use fewer processes per machine"):
        check_cpu_memory(5 * 1024**3, 11 * 1024**3, processes=4)


def test_local_world_size_reads_the_launchers_variable():
    from zoft.launch import local_world_size

    assert local_world_size({}) == 1
    assert local_world_size({"WORLD_SIZE": "8"}) == 8  # one machine unless told otherwise
    assert local_world_size({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == 8


def test_zoft_train_with_offload_refuses_too_little_cpu_memory_for_its_processes_before_loading(
    tiny_llama_dir, sentiment_csv, tmp_path, monkeypatch, capsys
):
    import yaml
    from conftest import tiny_recipe

    from zoft import launch, plan
    from zoft.cli import main
    from zoft.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "out", offload="cpu")))
    one_copy = plan.shape_of_recipe(load_recipe(str(path))).total_params * 4
    monkeypatch.setattr(plan, "_cpu_available", lambda: int(1.5 * one_copy))  # room for one copy, not two
    monkeypatch.setattr(launch, "local_world_size", lambda environ=None: 2)
    loaded = []
    monkeypatch.setattr("zoft.run.build_model_and_tokenizer", lambda *a, **k: loaded.append(1))
    assert main(["train", str(path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("zoft: error: offload: the 2 processes on this machine each keep the model in CPU "
                              "memory: about 2 x ")
    assert err[-1].endswith("use fewer processes per machine, model.dtype: bfloat16, a machine with more memory, "
                            "or a smaller model")
    assert not loaded  # refused before any weights were read


def test_offload_memory_check_counts_fp32_masters_only_when_asked_for(
    tiny_llama_dir, sentiment_csv, tmp_path, monkeypatch, capsys
):
    import yaml
    from conftest import tiny_recipe

    from zoft import launch, plan
    from zoft.cli import main
    from zoft.config import load_recipe

    monkeypatch.setattr(launch, "local_world_size", lambda environ=None: 1)
    loaded = []

    def stub(*a, **k):
        loaded.append(1)
        raise ZoftError("stub: the model would load here")

    monkeypatch.setattr("zoft.run.build_model_and_tokenizer", stub)
    paths = {}
    for master in ("auto", "fp32"):
        paths[master] = tmp_path / f"{master}.yaml"
        paths[master].write_text(yaml.safe_dump(tiny_recipe(
            tiny_llama_dir, sentiment_csv, tmp_path / master, offload="cpu", model={"dtype": "bfloat16"},
            method={"master_weights": master})))
    need = {m: plan.host_bytes_per_process(load_recipe(str(p))) for m, p in paths.items()}
    full = plan.shape_of_recipe(load_recipe(str(paths["fp32"]))).total_params
    assert need["fp32"] >= need["auto"] + 4 * full // 2  # the fp32 copies count (at least where training peaks)
    # the bf16 model (with its loading peak) fits, the fp32 masters on top do not
    monkeypatch.setattr(plan, "_cpu_available", lambda: (need["auto"] + need["fp32"]) // 2)
    for master, refused in (("auto", False), ("fp32", True)):
        path = paths[master]
        assert main(["train", str(path)]) != 0
        err = capsys.readouterr().err.strip().splitlines()[-1]
        if refused:
            assert err.startswith("zoft: error: offload: the model needs about ")
            assert " GiB fp32 masters) of CPU memory, only " in err
            assert err.endswith("use method.master_weights: auto (no fp32 copies), a machine with more memory, "
                                "or a smaller model")
    assert len(loaded) == 1  # auto went on to load the model (stubbed to fail); fp32 was refused before
