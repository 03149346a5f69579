"""The fused z perturb/update kernels against their plain-torch Philox reference.

The Triton kernels run under TRITON_INTERPRET=1 in a subprocess (tests/zo_kernels_interpret_worker.py);
the reference runs here. Philox words and Rademacher z must match bit for bit; Gaussian z to a few
ulp (numpy's and the GPU's fp32 log/cos/sin are not correctly rounded), and the kernels' arithmetic
must match the torch formula exactly when fed the kernel's own z.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoft.errors import ZoftError
from zoft.kernels import zo_reference as R
from zoft.kernels.zo_ops import zo_ops

sys.path.insert(0, str(Path(__file__).parent))
import zo_kernels_interpret_worker as W  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# |z| < 5.7 (u1 >= 1e-7), so 4 ulp at the top of the range.
Z_ATOL = 4 * 2**-21


def _philox_general(c, k, rounds=10):
    """Philox4x32 on a full 4-word counter, via the reference's round function."""
    c0, c1, c2, c3 = (torch.tensor([x], dtype=torch.int64) for x in c)
    return [int(x) for x in R._philox_rounds(c0, c1, c2, c3, k[0], k[1], rounds)]


def test_philox_matches_random123_known_answers():
    # Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors), the generator's reference.
    assert _philox_general((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert _philox_general((ones,) * 4, (ones, ones)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = _philox_general((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))
    assert pi == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.fixture(scope="module")
def kern(tmp_path_factory):
    """Outputs of the Triton kernels run by the interpreter on CPU."""
    path = tmp_path_factory.mktemp("zo") / "kernels.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "zo_kernels_interpret_worker.py"), str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


def _u32(x):
    return x.to(torch.int64) & 0xFFFFFFFF


def test_philox_words_bit_exact_with_tl_randint4x(kern):
    words = torch.stack(R.philox4x32(W.SEED_BIG, torch.arange(2_500)), dim=1).reshape(-1)
    assert torch.equal(words, _u32(kern["words_big"]))
    # Counters past 2**32 use the second counter word, as Triton does for int64 offsets.
    hi = torch.stack(R.philox4x32(W.SEED_SMALL, torch.arange(2**32 - 1_000, 2**32 + 1_500)), dim=1).reshape(-1)
    assert torch.equal(hi, _u32(kern["words_hi"]))


def test_reference_normal_matches_tl_randn_to_ulps(kern):
    # tl.randn(seed, c) is lane 0 of counter c in the z stream.
    ref = R.philox_randn(W.SEED_BIG, 4 * 2_500)[::4]
    torch.testing.assert_close(kern["randn_big"], ref, rtol=0, atol=Z_ATOL)


@pytest.mark.parametrize("key,seed,offset", [("z_big", W.SEED_BIG, 0), ("z_small", W.SEED_SMALL, 0),
                                              ("z_far", W.SEED_BIG, 2**35 + 3)])
def test_kernel_gaussian_z_matches_reference(kern, key, seed, offset):
    ref = R.philox_randn(seed, W.N, offset=offset)
    torch.testing.assert_close(kern[key], ref, rtol=0, atol=Z_ATOL)
    # Most elements agree exactly; the rest differ in the last bits only.
    assert (kern[key] == ref).float().mean() > 0.5


def test_kernel_rademacher_z_bit_exact(kern):
    ref = R.philox_rademacher(W.SEED_BIG, W.N)
    assert torch.equal(kern["rad_big"], ref)
    assert set(ref.unique().tolist()) == {-1.0, 1.0}


def test_z_is_a_function_of_seed_and_offset_only(kern, monkeypatch):
    # Kernel: two launches with offsets give the same elements as one launch.
    assert torch.equal(kern["chunk_parts"], kern["chunk_whole"])
    # Reference: any split, including ones inside a group of 4 and across its internal chunks
    # (made small here so the test crosses several).
    monkeypatch.setattr(R, "_CHUNK_COUNTERS", 256)
    n = 4 * R._CHUNK_COUNTERS + 1_003
    whole = R.philox_z(123, n)
    for cut in (1, 3, 1_025, 4 * R._CHUNK_COUNTERS - 2, 4 * R._CHUNK_COUNTERS + 5):
        parts = torch.cat([R.philox_z(123, cut), R.philox_z(123, n - cut, offset=cut)])
        assert torch.equal(parts, whole)
    assert torch.equal(R.philox_z(123, 10, offset=2**40 + 1), R.philox_z(123, 20, offset=2**40)[1:11])
    assert not torch.equal(R.philox_z(123, 100), R.philox_z(124, 100))


def test_reference_statistics():
    n = 1_000_000
    z = R.philox_randn(2024, n)
    # Tolerances: 5 standard errors of each statistic at this n.
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1.0) < 5 / math.sqrt(2 * n)
    p1 = (z.abs() < 1).float().mean().item()
    assert abs(p1 - 0.682689) < 5 * math.sqrt(0.682689 * 0.317311 / n)
    # The four lanes of a counter (cos/sin pairs of Box-Muller) and neighbouring counters are uncorrelated.
    lanes = z.view(-1, 4)
    corr = torch.corrcoef(torch.cat([lanes[:-1], lanes[1:, :1]], dim=1).T)
    assert (corr - torch.eye(5)).abs().max() < 5 / math.sqrt(n / 4)
    # Different seeds give uncorrelated directions.
    assert abs(torch.dot(z, R.philox_randn(2025, n)).item() / n) < 5 / math.sqrt(n)
    r = R.philox_rademacher(2024, n)
    assert abs(r.mean().item()) < 5 / math.sqrt(n)


def _upd_reference_arith(w, seeds, coefs, zs, wd):
    acc = w.float() * torch.tensor(1.0 - wd, dtype=torch.float32)
    for s, c in zip(seeds, coefs):
        acc = acc - zs[s] * torch.tensor(c, dtype=torch.float32)
    return acc


@pytest.mark.parametrize("name", ["f32_f32_k2", "f32_bf16_k4", "bf16_bf16_k1", "f32_f16_k3_rad"])
def test_fused_update_perturb_kernel(kern, name):
    fused_w, fused_out, unfused_w, unfused_out = kern[f"fused_{name}"]
    # Fused equals update-then-perturbed_copy bit for bit, in every storage dtype.
    assert torch.equal(fused_w, unfused_w) and torch.equal(fused_out, unfused_out)
    k = int(name.split("_k")[1][0])
    rad = name.endswith("rad")
    seeds, coefs = W.UPD_SEEDS[:k], W.UPD_COEFS[:k]
    # The kernel's arithmetic is the torch formula exactly, given the kernel's own z.
    zs = {s: kern[("rad_" if rad else "z_") + str(s)] for s in seeds + [W.PERT_SEED]}
    new = _upd_reference_arith(kern["w"].to(fused_w.dtype), seeds, coefs, zs, W.WD).to(fused_w.dtype)
    assert torch.equal(fused_w, new)
    pert = (new.float() + zs[W.PERT_SEED] * torch.tensor(W.EPS)).to(fused_out.dtype)
    assert torch.equal(fused_out, pert)
    # And the torch reference (its own z) agrees: exactly for Rademacher, to z's ulps otherwise.
    ref_w = kern["w"].clone().to(fused_w.dtype)
    ref_out = torch.empty_like(fused_out)
    R.fused_update_perturb(ref_w, seeds, coefs, W.WD, W.PERT_SEED, W.EPS, ref_out, rademacher=rad)
    if rad:
        assert torch.equal(ref_w, fused_w) and torch.equal(ref_out, fused_out)
    else:
        torch.testing.assert_close(ref_w.float(), fused_w.float(), rtol=0, atol=1e-6)
        # A few-ulp fp32 difference can flip a bf16 rounding: allow one bf16 ulp.
        torch.testing.assert_close(ref_out.float(), fused_out.float(), rtol=2**-7, atol=1e-6)


def test_kernel_rounding_bits_are_the_reference_philox_bits(kern):
    assert torch.equal(kern["bits"], R.philox_bits(W.ROUND_SEED, 4 * 1_001))
    assert torch.equal(kern["bits_far"], R.philox_bits(W.ROUND_SEED, 4 * 1_001, offset=4 * (2**33 + 1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_stochastic_rounding_is_the_reference_rule_bit_for_bit(kern, dtype):
    # The kernel's integer/float formulation of the rule against the reference's (and so against the
    # table look-up of test_lowprec): weights, fp16 subnormals, overflow, inf and NaN.
    x = W.rounding_inputs()
    tag = str(dtype).removeprefix("torch.")
    want = R.stochastic_round(x, dtype, R.philox_bits(W.ROUND_SEED, x.numel())).float()
    got = kern[f"sr_f32w_{tag}"]
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])
    # ...and the same call of the torch reference (what runs off CUDA) gives the same fp32 tensor.
    ref = R.fused_update_perturb(x.clone(), [], [], W.ROUND_ONLY_WD, round_dtype=dtype, round_seed=W.ROUND_SEED)
    assert torch.equal(ref[~want.isnan()], want[~want.isnan()])
    near = kern[f"sr_nearest_{tag}"]
    assert torch.equal(near[~want.isnan()], x.to(dtype).float()[~want.isnan()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("wdt", ["same", "float32"])
def test_fused_rounded_update_with_both_perturbed_copies_matches_the_reference(kern, dtype, wdt):
    tag = str(dtype).removeprefix("torch.")
    wdtype = dtype if wdt == "same" else torch.float32
    k = 2 if wdt == "same" else 3
    wk, plus, minus, sep_plus, sep_minus = kern[f"sr_fused_{tag}_{str(wdtype).removeprefix('torch.')}"]
    # The paired copies from one pass equal two separate perturbed copies of the stored (rounded) value.
    assert torch.equal(plus, sep_plus) and torch.equal(minus, sep_minus)
    # The stored value holds dtype's values, and equals the reference (Rademacher z: bit for bit).
    assert torch.equal(wk.to(dtype).to(wdtype), wk)
    ref_w = kern["w"].clone().mul_(0.05).to(wdtype)
    ref_p, ref_m = torch.empty_like(plus), torch.empty_like(minus)
    R.fused_update_perturb(ref_w, W.UPD_SEEDS[:k], W.UPD_COEFS[:k], W.WD, W.PERT_SEED, W.EPS, ref_p, rademacher=True,
                           out_minus=ref_m, round_dtype=dtype, round_seed=W.ROUND_SEED)
    assert torch.equal(ref_w, wk) and torch.equal(ref_p, plus) and torch.equal(ref_m, minus)


def test_pair_without_update_only_reads_w(kern):
    po, pm = kern["pair_only"]
    w, z = kern["w"], kern["z_" + str(W.PERT_SEED)]
    assert torch.equal(kern["pair_only_w"], w)
    assert torch.equal(po, (w + z * torch.tensor(W.EPS)).bfloat16())
    assert torch.equal(pm, (w + z * torch.tensor(-W.EPS)).bfloat16())


def test_reference_rounded_update_is_the_fp32_update_stochastically_rounded():
    torch.manual_seed(3)
    w = (torch.randn(70_000) * 0.05).bfloat16()
    seeds, coefs = [3, 2**62 + 9], [1e-5, -3e-6]
    got = R.fused_update_perturb(w.clone(), seeds, coefs, 1e-3, round_dtype=torch.bfloat16, round_seed=17)
    zs = {s: R.philox_randn(s, w.numel()) for s in seeds}
    exact = _upd_reference_arith(w, seeds, coefs, zs, 1e-3)
    assert torch.equal(got, R.stochastic_round(exact, torch.bfloat16, R.philox_bits(17, w.numel())))
    assert not torch.equal(got, exact.bfloat16())  # not round to nearest


def test_plus_minus_perturbation_from_fp32_master(kern):
    w, z = kern["w"], kern["z_big"]
    eps = torch.tensor(W.EPS)
    assert torch.equal(kern["master_after"], w)  # the master is only read
    assert torch.equal(kern["plus_f32"], w + z * eps)
    assert torch.equal(kern["minus_f32"], w + z * -eps)
    assert torch.equal(kern["plus_bf16"], (w + z * eps).bfloat16())
    assert torch.equal(kern["minus_bf16"], (w + z * -eps).bfloat16())
    # The reference's own z gives w +- eps z to one ulp of w (a z ulp can flip the rounding).
    ref = R.perturbed_copy(w, W.SEED_BIG, W.EPS)
    torch.testing.assert_close(kern["plus_f32"], ref, rtol=2**-22, atol=1e-9)
    torch.testing.assert_close(kern["chunk_whole"], ref, rtol=2**-22, atol=1e-9)


def test_axpy_kernel(kern):
    w = kern["w"]
    assert torch.equal(kern["axpy_f16_rad"], R.axpy_z_(w.half(), W.SEED_BIG, 0.25, rademacher=True))
    assert torch.equal(kern["axpy_f32"], w + kern["z_big"] * torch.tensor(0.25))


def test_kernel_store_rounds_to_nearest_even_like_torch(kern):
    x = kern["special_in"]
    expected = x + kern["z_big"][: len(x)] * 0.0  # eps = 0 (keeps the kernel's signed zeros)
    for key, dt in (("special_bf16", torch.bfloat16), ("special_f16", torch.float16)):
        got, want = kern[key], expected.to(dt)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_fused_equals_unfused(dtype, monkeypatch):
    torch.manual_seed(1)
    # Spans two of the reference's internal chunks (made small here).
    monkeypatch.setattr(R, "_CHUNK_COUNTERS", 256)
    w = torch.randn(4 * R._CHUNK_COUNTERS + 77).to(dtype)
    seeds, coefs = [3, 2**62 + 9], [1e-2, -3e-3]
    a, out_a = w.clone(), torch.empty(w.shape, dtype=torch.bfloat16)
    R.fused_update_perturb(a, seeds, coefs, 1e-3, 42, 1e-2, out_a)
    b = R.fused_update_perturb(w.clone(), seeds, coefs, 1e-3)
    out_b = R.perturbed_copy(b, 42, 1e-2, torch.empty_like(out_a))
    assert torch.equal(a, b) and torch.equal(out_a, out_b)
    # The update is w(1 - wd) - sum_k c_k z_k on the materialized z, rounded once to the storage dtype.
    zs = {s: R.philox_randn(s, w.numel()) for s in seeds}
    assert torch.equal(a, _upd_reference_arith(w, seeds, coefs, zs, 1e-3).to(dtype))


def test_reference_axpy_round_trip_in_fp32_is_close_not_exact():
    # Why the fp32 master matters: +eps then -eps in place does not restore w bit for bit.
    torch.manual_seed(2)
    w = torch.randn(50_000)
    v = R.axpy_z_(R.axpy_z_(w.clone(), 5, 1e-3), 5, -1e-3)
    torch.testing.assert_close(v, w, rtol=2**-22, atol=1e-9)
    b = R.axpy_z_(R.axpy_z_(w.bfloat16(), 5, 1e-3), 5, -1e-3)
    assert (b != w.bfloat16()).any()


def test_bad_input_is_a_one_line_zoft_error():
    w = torch.zeros(8)
    with pytest.raises(ZoftError, match="seed"):
        R.perturbed_copy(w, -1, 1.0)
    with pytest.raises(ZoftError, match="seed"):
        R.perturbed_copy(w, 2**63, 1.0)
    with pytest.raises(ZoftError, match="contiguous"):
        R.perturbed_copy(torch.zeros(4, 4).T, 1, 1.0)
    with pytest.raises(ZoftError, match="dtype"):
        R.perturbed_copy(torch.zeros(8, dtype=torch.int32), 1, 1.0)
    with pytest.raises(ZoftError, match="at most 4"):
        R.fused_update_perturb(w, [1, 2, 3, 4, 5], [1.0] * 5)
    with pytest.raises(ZoftError, match="equal lists"):
        R.fused_update_perturb(w, [1, 2], [1.0])
    with pytest.raises(ZoftError, match="pert_seed"):
        R.fused_update_perturb(w, [1], [1.0], out=torch.zeros(8))
    with pytest.raises(ZoftError, match="out is w"):
        R.fused_update_perturb(w, [1], [1.0], pert_seed=2, out=w)
    with pytest.raises(ZoftError, match="elements"):
        R.perturbed_copy(w, 1, 1.0, out=torch.zeros(9))
    with pytest.raises(ZoftError, match="offset"):
        R.perturbed_copy(w, 1, 1.0, offset=-4)
    with pytest.raises(ZoftError, match="out_minus without out"):
        R.fused_update_perturb(w, [1], [1.0], out_minus=torch.zeros(8))
    with pytest.raises(ZoftError, match="cannot hold"):
        R.fused_update_perturb(w.half(), [1], [1.0], round_dtype=torch.bfloat16, round_seed=3)
    with pytest.raises(ZoftError, match="round_seed without round_dtype"):
        R.fused_update_perturb(w, [1], [1.0], round_seed=3)


def test_dispatcher(monkeypatch):
    monkeypatch.delenv("ZOFT_ZO_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert zo_ops("cpu").backend == "torch"
    assert zo_ops("cpu").perturbed_copy is R.perturbed_copy
    assert zo_ops("cuda").backend == "triton"  # triton is installed here; nothing is launched
    monkeypatch.setenv("ZOFT_ZO_KERNEL", "torch")
    assert zo_ops("cuda").backend == "torch"
    monkeypatch.setenv("ZOFT_ZO_KERNEL", "triton")
    with pytest.raises(ZoftError, match="TRITON_INTERPRET"):
        zo_ops("cpu")
    monkeypatch.setenv("ZOFT_ZO_KERNEL", "cuda")
    with pytest.raises(ZoftError, match="ZOFT_ZO_KERNEL"):
        zo_ops("cpu")


def test_triton_launcher_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from zoft.kernels import zo_triton

    with pytest.raises(ZoftError, match="CUDA"):
        zo_triton.perturbed_copy(torch.zeros(8), 1, 1.0)


# ---- real kernels on a GPU (skipped without CUDA) ----

def _cuda_input(n, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randn(n, device="cuda", generator=g).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rad", [False, True])
def test_gpu_kernels_match_reference(rad):
    ops = zo_ops("cuda")
    assert ops.backend == "triton"
    n, seed = 3_000_017, 2**62 + 5
    w = _cuda_input(n)
    z = ops.perturbed_copy(torch.zeros_like(w), seed, 1.0, rademacher=rad)
    ref_z = R.philox_z(seed, n, "cuda", rademacher=rad)
    if rad:
        assert torch.equal(z, ref_z)
    else:
        # The GPU's approximate log/sin/cos; about 1e-6 expected.
        torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-5)
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    ops.perturbed_copy(w, seed, 1e-3, out, rademacher=rad)
    torch.testing.assert_close(out.float(), (w + z * 1e-3).bfloat16().float(), rtol=2**-7, atol=0)
    a = w.clone()
    out_a = torch.empty_like(out)
    ops.fused_update_perturb(a, [1, 2, 3], [1e-3, -1e-3, 2e-3], 1e-4, 7, 1e-3, out_a, rademacher=rad)
    b = ops.fused_update_perturb(w.clone(), [1, 2, 3], [1e-3, -1e-3, 2e-3], 1e-4, rademacher=rad)
    assert torch.equal(a, b)
    assert torch.equal(out_a, ops.perturbed_copy(b, 7, 1e-3, torch.empty_like(out), rademacher=rad))
    c = w.clone()
    R.fused_update_perturb(c, [1, 2, 3], [1e-3, -1e-3, 2e-3], 1e-4, rademacher=rad)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-7)


@pytest.mark.gpu
def test_gpu_kernel_chunking_and_large_offsets():
    ops = zo_ops("cuda")
    n, cut, seed = 1_000_003, 333_333, 17
    w = _cuda_input(n)
    whole = ops.perturbed_copy(w, seed, 0.5, offset=2**34 + 1)
    parts = torch.cat([ops.perturbed_copy(w[:cut], seed, 0.5, offset=2**34 + 1),
                       ops.perturbed_copy(w[cut:], seed, 0.5, offset=2**34 + 1 + cut)])
    assert torch.equal(whole, parts)
