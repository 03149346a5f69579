"""zoft: fine-tune Hugging Face language models when GPU memory is the constraint."""

__version__ = "0.1.0"

__all__ = ["ZoftTrainer", "ZoftCallback", "ZoftMetricsCallback", "MeZOConfig", "load_recipe", "__version__"]


def __getattr__(name):
    # Lazy: `import zoft` stays cheap and the CLI can report recipe errors before torch loads.
    if name == "ZoftTrainer":
        from zoft.trainer import ZoftTrainer

        return ZoftTrainer
    if name == "ZoftCallback":
        from zoft.callback import ZoftCallback

        return ZoftCallback
    if name == "ZoftMetricsCallback":
        from zoft.metrics import ZoftMetricsCallback

        return ZoftMetricsCallback
    if name == "MeZOConfig":
        from zoft.zo.mezo import MeZOConfig

        return MeZOConfig
    if name == "load_recipe":
        from zoft.config import load_recipe

        return load_recipe
    raise AttributeError(f"module 'zoft' has no attribute {name!r}")
