"""A small byte-level GPT and its FLOPs estimate, shared by demos, tests and benchmarks.

The model is GPT-2 shaped (pre-LayerNorm blocks, causal self-attention with one fused ``qkv`` Linear, a GELU
MLP) and small enough to train on a CPU. Every projection is an ``nn.Linear``, so ``GroupInfluence`` with
``layers=None`` tracks all of them: per block ``attn.qkv``, ``attn.proj``, ``mlp.fc`` and ``mlp.proj``. With
``tie_head=True`` (the default, as in GPT-2) the output head reuses the token embedding through ``F.linear``
and is therefore not an ``nn.Linear``; with ``tie_head=False`` it is the Linear ``lm_head``.

The model returns logits only; its loss is the core ``tikmix_loader.losses.per_token_loss`` (re-exported here
and from ``tikmix_loader.models``), which follows whichever label convention the batch records, so TinyGPT
trains the same on ``"shifted"`` and ``"hf"`` batches. Padding sits on the right, so causal attention never
lets a real token see it and ``attention_mask`` needs no special handling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tikmix_loader.errors import ConfigError
from tikmix_loader.losses import per_token_loss as per_token_loss  # re-exported: demos import it from here


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a ``TinyGPT``.

    Args:
        vocab_size (int): Vocabulary size. Default: 258 (bytes 0..255, EOS 256, PAD 257).
        seq_len (int): Longest input the position embedding covers. Default: 128.
        d_model (int): Residual width. Default: 128.
        n_layer (int): Transformer blocks. Default: 4.
        n_head (int): Attention heads; must divide ``d_model``. Default: 4.
        mlp_ratio (int): MLP hidden width as a multiple of ``d_model``. Default: 4.
        tie_head (bool): Reuse the token embedding as the output head. Default: True.
        bias (bool): Give the Linear and LayerNorm layers biases. Default: True.
    """

    vocab_size: int = field(default=258, metadata={"help": "vocabulary size (258 = bytes + EOS + PAD)"})
    seq_len: int = field(default=128, metadata={"help": "longest input (position embedding size)"})
    d_model: int = field(default=128, metadata={"help": "residual width"})
    n_layer: int = field(default=4, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads; must divide d_model"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP hidden width / d_model"})
    tie_head: bool = field(default=True, metadata={"help": "reuse the token embedding as the output head"})
    bias: bool = field(default=True, metadata={"help": "biases in Linear and LayerNorm layers"})

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "d_model", "n_layer", "n_head", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GPTConfig: `{name}` must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"GPTConfig: `n_head`={self.n_head} must divide `d_model`={self.d_model}; pick a divisor"
            )

    def to_dict(self) -> dict:
        """The config as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named preset (see ``PRESETS``), with any field overridden by keyword.

        Raises:
            ConfigError: ``name`` is not a preset; the message lists the valid ones.
        """
        if name not in PRESETS:
            raise ConfigError(f"GPTConfig.preset: unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# micro: unit tests (~28k params). tiny: CPU experiments (~0.84M). small: CPU benchmarks (~10.8M).
# medium: the experiment at GPU scale (~31.8M).
PRESETS: dict[str, dict] = {
    "micro": {"d_model": 32, "n_layer": 2, "n_head": 2, "seq_len": 64},
    "tiny": {"d_model": 128, "n_layer": 4, "n_head": 4, "seq_len": 128},
    "small": {"d_model": 384, "n_layer": 6, "n_head": 6, "seq_len": 256},
    "medium": {"d_model": 512, "n_layer": 10, "n_head": 8, "seq_len": 512},
}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``qkv`` Linear and an output ``proj`` Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq, width = h.shape
        q, k, v = self.qkv(h).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """The block's feed-forward part: ``fc`` Linear, GELU, ``proj`` Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=config.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(h)))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``h + attn(ln_1(h))``, then ``h + mlp(ln_2(h))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.mlp(self.ln_2(h))


class TinyGPT(nn.Module):
    """A byte-level GPT: ``model(input_ids [B, T]) -> logits [B, T, vocab_size]``.

    Args:
        config (GPTConfig): The shape. Default: ``GPTConfig()`` (the ``tiny`` preset's shape).
        seed (int | None): Seeds the initialisation (a private generator; the global RNG is untouched).
            Default: None (use the global RNG).
    """

    def __init__(self, config: GPTConfig | None = None, *, seed: int | None = None):
        super().__init__()
        self.config = config = config or GPTConfig()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = None if config.tie_head else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights(seed)

    @classmethod
    def from_preset(cls, name: str, *, seed: int | None = None, **overrides) -> TinyGPT:
        """A model of preset ``name`` (``micro``, ``tiny``, ``small``) with fields overridden by keyword."""
        return cls(GPTConfig.preset(name, **overrides), seed=seed)

    def _init_weights(self, seed: int | None) -> None:
        # GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layer).
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() == 1:
                    param.copy_(
                        torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param)
                    )
                else:
                    std = residual_std if name.endswith("proj.weight") else 0.02
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        if seq > self.config.seq_len:
            raise ConfigError(
                f"TinyGPT: input has {seq} positions but `seq_len`={self.config.seq_len}; "
                "build the model with a larger seq_len or shorten the batch"
            )
        positions = torch.arange(seq, device=input_ids.device)
        h = self.wte(input_ids) + self.wpe(positions)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return F.linear(h, self.wte.weight) if self.lm_head is None else self.lm_head(h)


def count_parameters(config: GPTConfig, *, embeddings: bool = False) -> int:
    """Parameters of a ``TinyGPT`` with ``config``: the non-embedding count (Kaplan et al.'s N) by default.

    Args:
        config (GPTConfig): The model shape.
        embeddings (bool): Include the token and position embeddings (and an untied head). Default: False.
    """
    d, hidden, bias = config.d_model, config.mlp_ratio * config.d_model, int(config.bias)
    linear = 3 * d * d + d * d + 2 * d * hidden + bias * (3 * d + d + hidden + d)
    norms = (2 if config.bias else 1) * d * 2
    total = config.n_layer * (linear + norms) + (2 if config.bias else 1) * d
    if embeddings:
        total += (config.vocab_size + config.seq_len) * d + (0 if config.tie_head else config.vocab_size * d)
    return total


def flops_per_token(config: GPTConfig, *, training: bool = True, seq_len: int | None = None) -> float:
    """Approximate FLOPs to process one token (Kaplan et al. 2020, table 1).

    Forward: ``2 N + 2 n_layer seq_len d_model`` (weights plus attention scores) ``+ 2 d_model vocab_size``
    (the output head). A training step (forward plus backward) costs 3x the forward. Influence passes
    (forward plus backward to the layer outputs) are counted as training passes too, which slightly
    over-counts them; use the same helper for every method so the comparison stays fair.

    Args:
        config (GPTConfig): The model shape.
        training (bool): Count forward plus backward (3x) instead of the forward only. Default: True.
        seq_len (int | None): Context length of the batches. Default: ``config.seq_len``.
    """
    context = config.seq_len if seq_len is None else seq_len
    forward = (
        2 * count_parameters(config)
        + 2 * config.n_layer * context * config.d_model
        + 2 * config.d_model * config.vocab_size
    )
    return float(3 * forward if training else forward)


def estimate_flops(
    config: GPTConfig, tokens: int, *, training: bool = True, seq_len: int | None = None
) -> float:
    """Approximate FLOPs to process ``tokens`` tokens: ``flops_per_token(...) * tokens`` (about 6 N each)."""
    return flops_per_token(config, training=training, seq_len=seq_len) * float(tokens)
