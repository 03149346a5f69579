"""Low-rank methods on top of peft LoRA: LoRA-GA initialization (ga.py), LoRA-Pro optimizer (pro.py)."""

from zoft.lora.ga import estimate_target_gradients, init_lora_ga, save_initial_adapter, save_lora_ga_adapter
from zoft.lora.pro import create_lora_pro_optimizer, lora_pro_gradients

__all__ = [
    "create_lora_pro_optimizer",
    "estimate_target_gradients",
    "init_lora_ga",
    "lora_pro_gradients",
    "save_initial_adapter",
    "save_lora_ga_adapter",
]
