"""A lean decoder for the Llama, Qwen2 and Qwen3 families, reading K/V from the paged cache.

Parameter names mirror Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so
a checkpoint's safetensors load into it directly. Tokens of all sequences in a step are
flattened into one dimension T: projections and MLPs run once over all of them; only
attention looks at sequences one group at a time (see `engine.attention`).

Why a lean model instead of plugging paged attention into `transformers`' classes: at
the embedded model's size the per-step Python overhead of those classes (cache objects,
mask builders, output dataclasses) is larger than the arithmetic; measured in
`bench/engine.py`, this model runs several times faster per token on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.attention import AttentionBatch, paged_attention

SUPPORTED = ("llama", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq independent of length


@dataclass(slots=True, frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> ModelArgs:
        if config.model_type not in SUPPORTED:
            raise ValueError(f"model_type {config.model_type!r} is not supported; Braid runs {', '.join(SUPPORTED)}")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported; set use_sliding_window=false")
        attention_bias = bool(getattr(config, "attention_bias", False))
        eos = config.eos_token_id
        return cls(
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=config.model_type == "qwen2" or attention_bias,
            o_bias=config.model_type != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=config.model_type == "qwen3",
            tie_word_embeddings=bool(config.tie_word_embeddings),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )


def rope_inv_freq(config: PretrainedConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,), attention scaling) exactly as `transformers` computes them."""
    rope = config.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; Braid runs {', '.join(STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like transformers, then scale in the input dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch, kv: tuple
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin  # cos, sin: (T, 1, D)
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = kv
        out = paged_attention(q, k, v, k_cache[self.layer], v_cache[self.layer], batch)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch, kv: tuple):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.args = ModelArgs.from_hf(config)
        self.model = Decoder(self.args)
        self.lm_head = nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=False)
        # Kept in fp32 and outside the parameters, so casting the model never rounds it.
        self.inv_freq, self.rope_scaling = rope_inv_freq(config)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (T, 1, head_dim), computed in fp32 as transformers does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        batch: AttentionBatch,
        kv: tuple[torch.Tensor, torch.Tensor],  # pool K, V: (layers, num_slots, Hkv, D) each
        logit_rows: torch.Tensor,  # which of the T tokens to return logits for
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, kv)
        x = self.model.norm(x[logit_rows])
        return self.lm_head(x).float()  # (len(logit_rows), vocab)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype, device: str) -> CausalLM:
        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        with torch.device("meta"):
            model = cls(config)
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        tied = model.args.tie_word_embeddings
        if tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.to(device=device, dtype=dtype)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        with torch.device("cpu"):
            model.inv_freq = rope_inv_freq(config)[0].to(device)
        return model.eval()
