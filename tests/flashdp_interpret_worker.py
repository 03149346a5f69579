"""Run the FlashDP Triton kernel under TRITON_INTERPRET=1 on CPU and save inputs and outputs for
test_flashdp_triton.py.

A separate process because the interpreter must be switched on before triton is imported, and must
not leak into other tests. Usage: ``python tests/flashdp_interpret_worker.py OUT.pt``.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from zoft.kernels.flashdp_triton import clipped_linear_weight_grad_triton  # noqa: E402

SHAPES = [(3, 5, 20, 40), (2, 1, 33, 17), (4, 37, 16, 48)]  # tile remainders, T=1, several T tiles


def main(out: str) -> None:
    cases = []
    for batch, tokens, d_in, d_out in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, tokens, d_in, generator=gen)
        g = torch.randn(batch, tokens, d_out, generator=gen)
        x[1] *= 0.01  # a small-norm sample that stays unclipped next to clipped ones
        got, norms = clipped_linear_weight_grad_triton(x, g, 3.0, scale=1.5, block_t=16, block_o=16, block_i=16)
        start = torch.randn(d_out, d_in, generator=gen)
        acc, _ = clipped_linear_weight_grad_triton(x, g, 3.0, scale=1.5, out=start.clone())
        cases.append({"x": x, "g": g, "got": got, "norms": norms, "start": start, "acc": acc})
    torch.save(cases, out)


if __name__ == "__main__":
    main(sys.argv[1])
