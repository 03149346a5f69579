"""Differential privacy: FlashDP per-layer clipping (DP-SGD), DPZero for zeroth-order, accounting."""

from zoft.privacy.accounting import epsilon_spent, noise_for_target_epsilon
from zoft.privacy.dpzero import dpzero_projected_grad
from zoft.privacy.flashdp import (
    DPOptimizer,
    FlashDPHandle,
    PoissonBatchSampler,
    add_noise,
    attach_flashdp,
    split_total_bound,
)

__all__ = [
    "DPOptimizer",
    "FlashDPHandle",
    "PoissonBatchSampler",
    "add_noise",
    "attach_flashdp",
    "dpzero_projected_grad",
    "epsilon_spent",
    "noise_for_target_epsilon",
    "split_total_bound",
]
