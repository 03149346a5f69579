"""Seeded stochastic rounding: the rule, its bit streams, and offloaded bf16 storage against a plain loop."""

import json

import pytest
import torch
import yaml
from test_offload import batches, tiny

from zoft.kernels.zo_reference import _stochastic_generic, philox4x32
from zoft.zo.estimate import spsa
from zoft.zo.lowprec import RoundingBits, philox_bits, round_, round_to_dtype, rounding_seed, stochastic_round
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.offload import BlockOffloader, DeferredMeZOOptimizer, find_transformer_blocks
from zoft.zo.perturb import ZOParameters

DTYPES = [torch.bfloat16, torch.float16]


def _all_values(dtype):
    """Every finite value of a 16-bit dtype, ascending, in float64 (one 0)."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).double()
    return torch.unique(values[torch.isfinite(values)])


def reference_stochastic_round(x, dtype, r):
    """Textbook stochastic rounding by table look-up: the neighbours lo <= x <= hi among all values of dtype
    (infinity past the largest finite one, one spacing further); the one away from zero when
    (|x| - |toward|) / spacing >= 1 - r / 65536."""
    table, xd = _all_values(dtype), x.double()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    lo = table[(torch.searchsorted(table, xd, right=True) - 1).clamp_min(0)]
    hi = table[torch.searchsorted(table, xd, right=False).clamp_max(len(table) - 1)]
    top_gap = table[-1] - table[-2]
    lo = torch.where(xd > table[-1], table[-1], torch.where(xd < table[0], -inf, lo))
    hi = torch.where(xd > table[-1], inf, torch.where(xd < table[0], table[0], hi))
    gap = torch.where(torch.isinf(lo) | torch.isinf(hi), top_gap, hi - lo)
    toward = torch.where(xd >= 0, lo, hi)
    away = torch.where(xd >= 0, hi, lo)
    frac = torch.where(gap > 0, (xd.abs() - toward.abs()) / gap.clamp_min(1e-300), torch.zeros_like(xd))
    return torch.where(frac >= 1 - r.double() / 65536, away, toward)


def _values(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([
        torch.randn(3000, generator=g) * 0.05,  # weights
        torch.randn(300, generator=g) * 1e-6,  # below float16's normal range
        torch.randn(100, generator=g) * 1e-9,  # float16 subnormal / zero neighbourhood
        torch.randn(100, generator=g) * 300.0,
        torch.randn(100, generator=g) * 1e-39,  # float32 / bfloat16 subnormals
        torch.tensor([0.0, -0.0, 1.0, -1.0, 3e-41, -3e-41, 1e-8, -1e-8, 65000.0, 65519.0, -65510.0,
                      1.0 + 2.0**-9, 3.38e38, -3.3895e38, 2.0**-14 - 2.0**-30]),
    ]).float()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_stochastic_rounding_equals_the_table_lookup_reference(dtype):
    x = _values()
    g = torch.Generator().manual_seed(5)
    for r in (philox_bits(11, x.numel()), torch.randint(0, 65536, x.shape, generator=g, dtype=torch.int32),
              torch.zeros_like(x, dtype=torch.int32), torch.full_like(x, 65535, dtype=torch.int32)):
        got = stochastic_round(x, dtype, r)
        assert got.dtype == dtype
        assert torch.equal(got.double(), reference_stochastic_round(x, dtype, r))
        # The bf16 bit trick (add r to the fp32 bits, drop 16) is the generic rule exactly.
        assert torch.equal(got.view(torch.int16), _stochastic_generic(x, dtype, r).view(torch.int16))


def test_infinities_and_nan_stay_and_past_the_largest_value_rounds_up_to_infinity_stochastically():
    for dtype in DTYPES:
        top = torch.finfo(dtype).max
        spacing = top - torch.tensor(top, dtype=dtype).view(torch.int16).sub(1).view(dtype).item()
        x = torch.tensor([float("inf"), float("-inf"), float("nan"), top + 0.25 * spacing, -(top + 0.75 * spacing)])
        low, high = torch.zeros(5, dtype=torch.int32), torch.full((5,), 65535, dtype=torch.int32)
        lo, hi = stochastic_round(x, dtype, low).float(), stochastic_round(x, dtype, high).float()
        for got in (lo, hi):
            assert got[:2].tolist() == [float("inf"), float("-inf")] and got[2].isnan()
        assert lo[3:].tolist() == [top, -top]  # r = 0: toward zero unless frac = 1
        assert hi[3:].tolist() == [float("inf"), float("-inf")]  # r = 65535: away unless frac < 2^-16
        # In expectation: frac 0.25 and 0.75 of the bits go to infinity.
        r = torch.arange(65536, dtype=torch.int32)
        for value, frac in ((top + 0.25 * spacing, 0.25), (-(top + 0.75 * spacing), 0.75)):
            out = stochastic_round(torch.full((65536,), value), dtype, r)
            assert torch.isinf(out).double().mean().item() == frac


def test_philox_bits_are_16_bit_halves_of_the_philox_words_and_addressable_by_offset():
    seed = (1 << 62) + 9
    words = torch.stack(philox4x32(seed, torch.arange(100)), dim=1).reshape(-1)  # word (e // 2) % 4 of counter e // 8
    expected = torch.stack([words & 0xFFFF, words >> 16], dim=1).reshape(-1)
    assert torch.equal(philox_bits(seed, 800).long(), expected)
    assert torch.equal(philox_bits(seed, 301, offset=123).long(), expected[123:424])
    bits = RoundingBits(seed, "cpu", "philox")
    assert torch.equal(torch.cat([bits.take(5), bits.take(300), bits.take(3)]).long(), expected[:308])


@pytest.mark.parametrize("generator", ["philox", "torch"])
def test_rounding_bits_are_uniform_16_bit_integers(generator):
    r = RoundingBits(3, "cpu", generator).take(1 << 18)
    assert r.dtype == torch.int32 and int(r.min()) == 0 and int(r.max()) == 65535
    counts = torch.bincount(r.long() >> 12, minlength=16).double()  # 16 bins of 4096 values
    expected = r.numel() / 16
    assert ((counts - expected).abs() < 5 * expected**0.5).all()  # 5 sigma per bin
    low = torch.bincount(r.long() & 15, minlength=16).double()  # the low bits too
    assert ((low - expected).abs() < 5 * expected**0.5).all()


@pytest.mark.parametrize("generator", ["philox", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased_over_seeds_and_deterministic_for_a_seed(dtype, generator):
    x = (torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.05).float()
    n = 2000
    mean = torch.stack([round_to_dtype(x, dtype, "stochastic", s, generator=generator).double() for s in range(n)]).mean(0)
    table = _all_values(dtype)
    spacing = table[torch.searchsorted(table, x.double())] - table[torch.searchsorted(table, x.double(), right=True) - 1]
    # Each draw is lo or hi, so its standard deviation is at most spacing / 2: a 5-sigma bound on the mean.
    assert ((mean - x.double()).abs() <= 5 * spacing / 2 / n**0.5).all()
    # Round to nearest is biased by up to half a spacing, far outside that bound for most of these x.
    nearest_err = (x.to(dtype).double() - x.double()).abs()
    assert (nearest_err > 5 * spacing / 2 / n**0.5).sum() > 32
    once = round_to_dtype(x, dtype, "stochastic", 7, generator=generator)
    assert torch.equal(once, round_to_dtype(x, dtype, "stochastic", 7, generator=generator))
    assert not torch.equal(once, round_to_dtype(x, dtype, "stochastic", 8, generator=generator))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_representable_values_are_unchanged_and_nearest_is_torch_cast(dtype):
    x = _values(1)
    representable = x.to(dtype).float()
    for seed in range(5):
        assert torch.equal(round_to_dtype(representable, dtype, "stochastic", seed).float(), representable)
    assert torch.equal(round_to_dtype(x, dtype, "nearest"), x.to(dtype))
    y = x.clone()
    assert round_(y, dtype, "nearest") is y and y.dtype == torch.float32 and torch.equal(y, x.to(dtype).float())


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="needs a seed"):
        round_to_dtype(torch.ones(2), torch.bfloat16, "stochastic")
    with pytest.raises(ValueError, match="starts from float32"):
        round_to_dtype(torch.ones(2, dtype=torch.float64), torch.bfloat16, "nearest", 0)
    with pytest.raises(ValueError, match="unknown rounding"):
        round_to_dtype(torch.ones(2), torch.bfloat16, "up", 0)
    with pytest.raises(ValueError, match="unknown bits generator"):
        RoundingBits(0, "cpu", "mt")


def test_a_stream_of_tiny_updates_survives_with_stochastic_rounding_and_vanishes_with_nearest():
    # bf16 spacing above 1.0 is 2**-7 = 7.8e-3; 500 updates of 1e-5 (a ZO-sized lr * g * z) add 5e-3.
    final = {}
    for rounding in ("stochastic", "nearest"):
        w = torch.ones(4096)
        for step in range(500):
            w.add_(1e-5)
            round_(w, torch.bfloat16, rounding, rounding_seed(0, step, "w") if rounding == "stochastic" else None)
        final[rounding] = w
    assert torch.equal(final["nearest"], torch.ones(4096))  # every update was rounded away
    # Per element the rounding noise over 500 steps has std ~6e-3; over 4096 elements ~1e-4.
    assert abs(final["stochastic"].double().mean().item() - 1.005) < 6e-4


def test_rounding_seeds_depend_on_run_seed_step_name_and_group_only():
    assert rounding_seed(1, 2, "a") == rounding_seed(1, 2, "a") == rounding_seed(1, 2, "a", 0)
    seeds = {rounding_seed(1, 2, "a"), rounding_seed(2, 2, "a"), rounding_seed(1, 3, "a"), rounding_seed(1, 2, "b"),
             rounding_seed(1, 2, "a", 1)}
    assert len(seeds) == 5


# -- offloaded bf16 storage against a plain loop ------------------------------------------------------


def block_param_names(model):
    prefix, _ = find_transformer_blocks(model)
    return [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]


def plain_loop(model, data, rounding="stochastic", lr=1e-2, round_updates=True, z_generator="torch"):
    """In-memory MeZO; block weights start at their bf16 values, and each update rounds them to bf16."""
    blocks = block_param_names(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in blocks:
            params[n].copy_(params[n].to(torch.bfloat16))
    zo = ZOParameters(model, run_seed=3, z_generator=z_generator)
    if round_updates:
        for n in blocks:
            zo.round_to_storage(n, torch.bfloat16, rounding)
    log = []
    opt = MeZOOptimizer(zo, lr=lr, weight_decay=0.1, on_update=log.append)
    for step, ids in enumerate(data):
        for e in spsa(zo, lambda ids=ids: model(input_ids=ids, labels=ids).loss, step=step, eps=1e-2):
            opt.record(step, e)
        opt.step()
    return log


def offloaded_run(model, data, storage_dtype=torch.bfloat16, rounding="stochastic", lr=1e-2):
    offloader = BlockOffloader(model, "cpu", "cpu", storage_dtype=storage_dtype, rounding=rounding)
    zo = ZOParameters(model, run_seed=3)
    log = []
    opt = DeferredMeZOOptimizer(zo, lr=lr, weight_decay=0.1, on_update=log.append, offloader=offloader)
    assert not zo.masters  # no fp32 copies: the update rounds the resident fp32 values to bf16
    assert {n for n, (d, mode) in zo.rounding.items() if d == storage_dtype and mode == rounding} == (
        set(block_param_names(model)) if storage_dtype is not None else set())
    for step, ids in enumerate(data):
        for e in spsa(zo, lambda ids=ids: model(input_ids=ids, labels=ids).loss, step=step, eps=1e-2):
            opt.record(step, e)
        opt.step()
    opt.flush()
    return log, offloader


def test_bf16_storage_offloaded_run_equals_the_plain_loop_bit_for_bit_with_half_the_bytes():
    data = batches(4)
    ref_model, off_model, fp32_model = tiny("llama"), tiny("llama"), tiny("llama")
    ref_log = plain_loop(ref_model, data)
    off_log, offloader = offloaded_run(off_model, data)
    assert [r["coefficients"] for r in off_log] == [r["coefficients"] for r in ref_log]
    blocks = set(block_param_names(off_model))
    start = tiny("llama").state_dict()
    moved = 0.0
    for name, ref in ref_model.state_dict().items():
        off = off_model.state_dict()[name]
        assert off.dtype == (torch.bfloat16 if name in blocks else torch.float32), name
        assert torch.equal(ref, off.float()), name
        moved = max(moved, (ref - start[name]).abs().max().item())
    assert moved > 1e-4
    # Without the rounding after each update the plain loop ends elsewhere: the rounding is really applied.
    unrounded = tiny("llama")
    plain_loop(unrounded, data, round_updates=False)
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(unrounded.state_dict()[name], ref_model.state_dict()[name])
    # Stored blocks are bf16: half the storage and half the upload bytes of an fp32-stored run.
    _, fp32_offloader = offloaded_run(fp32_model, data, storage_dtype=None)
    assert offloader.uploads == fp32_offloader.uploads
    assert offloader.stored_bytes * 2 == fp32_offloader.stored_bytes
    assert offloader.uploaded_bytes * 2 == fp32_offloader.uploaded_bytes
    assert all(e[3].dtype == torch.bfloat16 for entries in offloader._stored for e in entries)


def test_with_nearest_rounding_a_small_update_vanishes_from_bf16_blocks_and_stochastic_keeps_it():
    # One step at lr 1e-6: updates of ~1e-6 against bf16 spacings of ~1e-4 for weights of ~0.02. The share
    # of the exact fp32 update that reaches the stored blocks is the projection <stored, exact> / |exact|^2.
    data = batches(1)
    exact_model = tiny("llama")
    plain_loop(exact_model, data, lr=1e-6, round_updates=False)
    names = block_param_names(exact_model)
    start = {n: tiny("llama").state_dict()[n].to(torch.bfloat16).double() for n in names}
    exact = torch.cat([(exact_model.state_dict()[n].double() - start[n]).flatten() for n in names])
    share = {}
    for rounding in ("nearest", "stochastic"):
        model = tiny("llama")
        offloaded_run(model, data, rounding=rounding, lr=1e-6)
        stored = torch.cat([(model.state_dict()[n].double() - start[n]).flatten() for n in names])
        share[rounding] = (stored @ exact / (exact @ exact)).item()
    # Nearest keeps only the updates of weights near zero (~5%); stochastic keeps all in expectation
    # (the noise of the projection over these 28k weights is ~0.06).
    assert share["nearest"] < 0.2
    assert 0.75 < share["stochastic"] < 1.25


# -- through the recipe: trajectory header, resume and replay ------------------------------------------


def test_recipe_with_bf16_storage_resumes_and_replays_exactly(tiny_llama_dir, sentiment_csv, tmp_path):
    from conftest import tiny_recipe, train_until_killed
    from test_mezo_trainer import _weights
    from transformers import AutoModelForCausalLM

    from zoft import checkpoints, run
    from zoft.config import validate_recipe
    from zoft.zo.trajectory import read_trajectory

    settings = {"train": {"max_steps": 6, "save_steps": 2},
                "offload": {"device": "cpu", "storage_dtype": "bfloat16"}}
    straight = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "straight", **settings))
    run.train(straight)
    header, records = read_trajectory(tmp_path / "straight" / "trajectory.jsonl")
    storage = header["storage"]
    assert storage["dtype"] == "bfloat16" and storage["rounding"] == "stochastic"
    assert storage["rounded"] and all(n.startswith("model.layers.") for n in storage["rounded"])

    killed = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path / "killed", **settings))
    trainer = train_until_killed(killed, 5)
    del trainer
    assert checkpoints.latest_complete_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    run.train(killed.model_copy(update={"output": killed.output.model_copy(update={"resume": True})}))

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # saved as stored
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_trajectory(tmp_path / "killed" / "trajectory.jsonl")[1] == records

    assert run.replay(str(tmp_path / "straight"), str(tmp_path / "rebuilt")) == 6
    c = _weights(tmp_path / "rebuilt")
    for k in a:
        assert torch.equal(a[k].float(), c[k]), k
    # The saved checkpoint is an ordinary one: transformers loads it (in float32, as its config says).
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    assert torch.equal(loaded["model.layers.1.self_attn.q_proj.weight"], c["model.layers.1.self_attn.q_proj.weight"])

    # Replay without the recorded storage would round nothing and end elsewhere: the recorded per-parameter
    # rounding makes it refuse in one line instead.
    from zoft.errors import ZoftError

    lines = (tmp_path / "straight" / "trajectory.jsonl").read_text().splitlines()
    head = json.loads(lines[0])
    assert head["rounding"]["model.layers.1.self_attn.q_proj.weight"] == ["bfloat16", "stochastic"]
    del head["storage"]
    (tmp_path / "straight" / "trajectory.jsonl").write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(ZoftError, match=r"^trajectory: the run rounded the updates of 'model\.layers\.0\..*' as "
                                        r"\['bfloat16', 'stochastic'\], this replay would use fp32 \(none\); replay with "
                                        r"the run's recipe \(model.dtype, method.master_weights\)$"):
        run.replay(str(tmp_path / "straight"), str(tmp_path / "unrounded"))


def test_replay_refuses_a_storage_it_cannot_reproduce_in_one_line():
    from zoft.errors import ZoftError
    from zoft.zo.trajectory import storage_rounding

    assert storage_rounding({}) is None
    with pytest.raises(ZoftError, match=r"^trajectory: storage dtype 'float8' with rounding 'stochastic' cannot be "
                                        r"replayed by this zoft version"):
        storage_rounding({"storage": {"dtype": "float8", "rounding": "stochastic", "rounded": []}})


@pytest.mark.parametrize("sections,expected", [
    ({"model": {"dtype": "bfloat16"}, "offload": {"storage_dtype": "bfloat16"}},
     "offload.storage_dtype bfloat16 needs model.dtype float32 (the dtype blocks compute in), not 'bfloat16'; "
     "set model.dtype: float32, or drop offload.storage_dtype to store the blocks in bfloat16"),
    ({"model": {"dtype": "bfloat16"}, "offload": {"storage_dtype": "float16"}},
     "offload.storage_dtype float16 needs model.dtype float32"),
    ({"model": {"dtype": "auto"}, "offload": {"storage_dtype": "bfloat16"}},
     "offload.storage_dtype bfloat16 needs model.dtype float32"),
    ({"offload": {"rounding": "nearest"}},
     "offload.rounding: only used with offload.storage_dtype (blocks are stored in model.dtype)"),
    ({"offload": {"storage_dtype": "bfloat16"}, "method": {"master_weights": "fp32"}},
     "method.master_weights fp32 with offload.storage_dtype: an fp32 copy of every trained weight undoes"),
    ({"offload": {"storage_dtype": "float8"}}, "offload.storage_dtype: Input should be 'bfloat16' or 'float16'"),
    ({"method": {"name": "adamw", "master_weights": "fp32"}},
     "method.master_weights: only used by zeroth-order methods (their seeded update); method 'adamw' updates "
     "through its optimizer in the model's dtype; drop it"),
    ({"model": {"dtype": "bfloat16"}, "offload": {"rounding": "nearest"}},
     "the updates of bf16/fp16 model weights are rounded as method.master_weights says (auto: stochastic, none: nearest)"),
    ({"method": {"master_weights": "fp16"}}, "method.master_weights: Input should be 'auto', 'fp32' or 'none'"),
    ({"offload": {"sliced_upload": True}},
     "offload.sliced_upload: true shares block uploads among DistZO2 ranks, but the recipe has no distributed "
     "section; add one (distributed: {}) and launch several processes, or use auto"),
])
def test_master_weights_and_offload_settings_that_cannot_work_are_refused_in_one_line(tiny_llama_dir, sentiment_csv, tmp_path,
                                                                    sections, expected):
    from conftest import tiny_recipe

    from zoft.config import validate_recipe
    from zoft.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, **sections))
    assert len(e.value.lines) == 1 and expected in e.value.lines[0], e.value.lines


def test_storage_settings_are_accepted_with_a_float32_model(tiny_llama_dir, sentiment_csv, tmp_path):
    from conftest import tiny_recipe

    from zoft.config import recipe_to_yaml, validate_recipe

    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path,
                                         offload={"storage_dtype": "float16", "rounding": "nearest"}))
    assert (recipe.offload.storage_dtype, recipe.offload.resolved_rounding) == ("float16", "nearest")
    assert validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, offload="cpu")).offload.storage_dtype is None
    saved = validate_recipe(tiny_recipe(tiny_llama_dir, sentiment_csv, tmp_path, offload={"storage_dtype": "bfloat16"}))
    assert saved.offload.resolved_rounding == "stochastic"
    assert validate_recipe(yaml.safe_load(recipe_to_yaml(saved))) == saved  # recipe.yaml round-trips


def test_float16_storage_refuses_weights_beyond_its_range():
    from zoft.errors import ZoftError

    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(ZoftError, match=r"^offload.storage_dtype: float16 cannot hold block 2's weights .* use bfloat16$"):
        BlockOffloader(model, "cpu", "cpu", storage_dtype=torch.float16)


def test_bf16_storage_with_philox_z_fuses_the_rounded_update_and_equals_the_plain_loop():
    # The fused kernel rounds the updated value (seeded philox bits) before it perturbs it, so fusion stays on
    # with low-precision storage and the run equals the in-memory loop with the same rounding.
    data = batches(3)
    ref_model, off_model = tiny("llama"), tiny("llama")
    ref_log = plain_loop(ref_model, data, z_generator="philox")
    offloader = BlockOffloader(off_model, "cpu", "cpu", storage_dtype=torch.bfloat16, rounding="stochastic")
    zo = ZOParameters(off_model, run_seed=3, z_generator="philox")
    log = []
    off_opt = DeferredMeZOOptimizer(zo, lr=1e-2, weight_decay=0.1, on_update=log.append, offloader=offloader)
    assert off_opt.fuse is True and zo.pending_update is not None
    for step, ids in enumerate(data):
        for e in spsa(zo, lambda ids=ids: off_model(input_ids=ids, labels=ids).loss, step=step, eps=1e-2):
            off_opt.record(step, e)
        off_opt.step()
    off_opt.flush()
    assert off_opt.applied_in_forward > 0  # updates reached the perturbations (the fused pass)
    assert [r["coefficients"] for r in log] == [r["coefficients"] for r in ref_log]
    for name, ref in ref_model.state_dict().items():
        assert torch.equal(ref, off_model.state_dict()[name].float()), name
