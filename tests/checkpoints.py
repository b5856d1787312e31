"""Tiny random Hugging Face checkpoints of each supported family, made locally (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

VOCAB = 96


def tiny_config(arch: str) -> PretrainedConfig:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=2,
        bos_token_id=1,
    )
    if arch == "llama":  # Llama 3 RoPE scaling, untied head
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
        return LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    if arch == "qwen2":  # qkv bias, tied embeddings
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":  # q/k norm, head_dim not hidden/heads
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    raise ValueError(arch)


def make_checkpoint(arch: str, folder: Path, seed: int = 0, config: PretrainedConfig | None = None) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or tiny_config(arch))
    with torch.no_grad():  # random biases too, so the qkv-bias path is really exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: one token per byte, so multi-byte characters span tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def make_text_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama with a byte tokenizer (vocab 256), for text-level tests."""
    config = tiny_config("llama")
    config.vocab_size = 256
    make_checkpoint("llama", folder, seed, config)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def load_reference(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
