"""Optimizers that save optimizer-state memory: Natural GaLore (and the GaLore projector it uses)."""

from zoft.optim.natural_galore import (
    NaturalGaLore,
    NaturalGaLoreLayerwise,
    check_layerwise_compatible,
    create_natural_galore_optimizer,
    natural_galore_cls_and_kwargs,
    natural_galore_param_groups,
)

__all__ = [
    "NaturalGaLore",
    "NaturalGaLoreLayerwise",
    "check_layerwise_compatible",
    "create_natural_galore_optimizer",
    "natural_galore_cls_and_kwargs",
    "natural_galore_param_groups",
]
