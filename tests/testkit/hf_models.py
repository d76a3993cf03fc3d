"""Tiny Hugging Face causal LMs built from local configs (random init, no download), for model and influence
tests. They need transformers (the ``[hf]`` extra, installed for the test suite)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 258


def tiny_gpt2(*, seq_len: int = 32, tie: bool = True) -> torch.nn.Module:
    """A 2-layer GPT-2 (``Conv1D`` projections), width 32, without dropout."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=seq_len,
        n_embd=32,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(*, seq_len: int = 32) -> torch.nn.Module:
    """A 2-layer Llama (``nn.Linear`` projections, grouped-query attention), width 32."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=seq_len,
    )
    return transformers.LlamaForCausalLM(config)
