"""The FlashDP Triton kernel against its plain-torch reference, on CPU under TRITON_INTERPRET=1."""

import os

# Triton decides at decoration time whether kernels are interpreted: set this before the import below.
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

if "triton" in sys.modules and "zoft.kernels.flashdp_triton" not in sys.modules:  # see note: order-dependent
    pytest.skip("triton was imported before TRITON_INTERPRET could be set; run this file alone", allow_module_level=True)
if "zoft.kernels.flashdp_triton" in sys.modules:  # imported earlier without the interpreter
    importlib.reload(sys.modules["zoft.kernels.flashdp_triton"])
from zoft.kernels.flashdp_reference import linear_grad_explicit  # noqa: E402
from zoft.kernels.flashdp_triton import clipped_linear_weight_grad_triton  # noqa: E402


@pytest.mark.parametrize(
    "batch,tokens,d_in,d_out",
    [(3, 5, 20, 40), (2, 1, 33, 17), (4, 37, 16, 48)],  # tile remainders, T=1, several T tiles
)
def test_triton_kernel_matches_reference_interpreted(batch, tokens, d_in, d_out):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, d_in, generator=gen)
    g = torch.randn(batch, tokens, d_out, generator=gen)
    x[1] *= 0.01  # a small-norm sample that stays unclipped next to clipped ones
    ref, ref_norms = linear_grad_explicit(x, g, 3.0, scale=1.5)
    assert (ref_norms < 3.0).any() and (ref_norms > 3.0).any()
    got, norms = clipped_linear_weight_grad_triton(x, g, 3.0, scale=1.5, block_t=16, block_o=16, block_i=16)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    start = torch.randn(d_out, d_in, generator=gen)
    acc, _ = clipped_linear_weight_grad_triton(x, g, 3.0, scale=1.5, out=start.clone())
    torch.testing.assert_close(acc, start + ref, rtol=1e-5, atol=1e-5)  # adds into an existing buffer


@pytest.mark.gpu
def test_triton_kernel_matches_reference_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 128, 256, device="cuda", generator=gen)
    g = torch.randn(8, 128, 192, device="cuda", generator=gen)
    ref, ref_norms = linear_grad_explicit(x, g, 50.0)
    got, norms = clipped_linear_weight_grad_triton(x, g, 50.0)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
