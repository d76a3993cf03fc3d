"""Reference models for demos, tests and benchmarks: the byte-level ``TinyGPT`` and its FLOPs."""

from tikmix_loader.models.tiny_gpt import (
    PRESETS,
    GPTConfig,
    TinyGPT,
    count_parameters,
    estimate_flops,
    flops_per_token,
    per_token_loss,
)

__all__ = [
    "GPTConfig",
    "PRESETS",
    "TinyGPT",
    "count_parameters",
    "estimate_flops",
    "flops_per_token",
    "per_token_loss",
]
assert __all__ == sorted(__all__), "keep __all__ sorted"
