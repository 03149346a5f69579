"""The FlashDP Triton kernel against its plain-torch reference, on CPU under TRITON_INTERPRET=1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoft.kernels.flashdp_reference import linear_grad_explicit

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The kernel's outputs under the Triton interpreter, from a separate process (see the worker's docstring)."""
    path = tmp_path_factory.mktemp("flashdp") / "kernel.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "flashdp_interpret_worker.py"), str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", range(3))  # the worker's SHAPES: tile remainders, T=1, several T tiles
def test_triton_kernel_matches_reference_interpreted(interpreted, case):
    c = interpreted[case]
    ref, ref_norms = linear_grad_explicit(c["x"], c["g"], 3.0, scale=1.5)
    assert (ref_norms < 3.0).any() and (ref_norms > 3.0).any()
    torch.testing.assert_close(c["norms"], ref_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c["got"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c["acc"], c["start"] + ref, rtol=1e-5, atol=1e-5)  # adds into an existing buffer


@pytest.mark.gpu
def test_triton_kernel_matches_reference_cuda():
    from zoft.kernels.flashdp_triton import clipped_linear_weight_grad_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 128, 256, device="cuda", generator=gen)
    g = torch.randn(8, 128, 192, device="cuda", generator=gen)
    ref, ref_norms = linear_grad_explicit(x, g, 50.0)
    got, norms = clipped_linear_weight_grad_triton(x, g, 50.0)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
