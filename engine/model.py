"""A lean decoder for the Llama, Qwen2 and Qwen3 families, reading K/V from the paged cache.

Weights load straight from a checkpoint's safetensors (Hugging Face names). Tokens of
all sequences in a step are flattened into one dimension T: projections and MLPs run once
over all of them; only attention looks at sequences group by group (`engine.attention`).

Why not plug paged attention into `transformers`' model classes: at the embedded model's
size a decode step is a few dozen tiny kernels, and per-op overhead is the cost. So this
model is plain functions over fused weights, measured in `bench/engine.py`:
- q/k/v are one matmul, gate/up one matmul; o_proj and down_proj add into the residual
  (`addmm`); weights are stored transposed, (in, out) and contiguous, which CPU GEMMs with
  few rows run about 1.4x faster than `F.linear` on the (out, in) layout;
- RoPE is one complex multiply: q/k rows are permuted at load time from the
  rotate-half layout (i, i + D/2) to adjacent pairs (2i, 2i + 1). Dot products are
  unchanged by permuting q and k alike, so logits are exactly those of the checkpoint;
  K in the cache is stored in that layout (internal to Braid).

Loading reads one tensor at a time from the safetensors files, casts it to the serving
dtype on the host, moves it to the device, and builds each layer's fused weights before the
next layer is read: the peak is the model plus one layer's temporaries, never a second copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
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
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    max_context: int  # positions the model was made for: a thread's context ends there

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> ModelArgs:
        if config.model_type not in SUPPORTED:
            raise ValueError(f"model_type {config.model_type!r} is not supported; Braid runs {', '.join(SUPPORTED)}")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported; set use_sliding_window=false")
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
            tie_word_embeddings=bool(config.tie_word_embeddings),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            max_context=config.max_position_embeddings,
        )


def rope_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,), attention scaling) exactly as `transformers` computes them."""
    rope = config.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; Braid runs {', '.join(STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config)


def pair_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows (i, i + D/2) -> (2i, 2i + 1), for complex RoPE."""
    half = torch.arange(head_dim // 2)
    order = torch.stack([half, half + head_dim // 2], dim=1).flatten()  # (D,)
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim, *w.shape[1:])[:, order].reshape(w.shape)


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    qkv_t: torch.Tensor  # (hidden, (Hq + 2 Hkv) D), q/k columns paired for RoPE
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # (Hq + Hkv, D) Qwen3: q_norm for q heads, k_norm for k heads, paired
    o_t: torch.Tensor  # (Hq D, hidden)
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_t: torch.Tensor  # (hidden, 2 I)
    gate_up_bias: torch.Tensor | None
    down_t: torch.Tensor  # (I, hidden)
    down_bias: torch.Tensor | None


class CausalLM:
    def __init__(
        self, args: ModelArgs, state: Mapping[str, torch.Tensor], inv_freq: torch.Tensor, scale: float
    ) -> None:
        """`state`: the checkpoint's tensors by name (each read once: `CheckpointTensors` loads on read)."""
        self.args = args
        d = args.head_dim

        def get(name: str) -> torch.Tensor | None:
            return state.get(name)

        def t(w: torch.Tensor) -> torch.Tensor:
            return w.t().contiguous()

        def cat(*names: str) -> torch.Tensor | None:
            parts = [state.get(n) for n in names]
            return None if parts[0] is None else torch.cat(parts)

        self.layers: list[LayerWeights] = []
        for i in range(args.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            qkv = torch.cat([pair_halves(state[a + "q_proj.weight"], d), pair_halves(state[a + "k_proj.weight"], d)])
            qkv = torch.cat([qkv, state[a + "v_proj.weight"]])
            bias = None
            if a + "q_proj.bias" in state:
                qk_b = [pair_halves(state[a + f"{x}_proj.bias"], d) for x in "qk"]
                bias = torch.cat([*qk_b, state[a + "v_proj.bias"]])
            q_norm = get(a + "q_norm.weight")
            k_norm = get(a + "k_norm.weight")
            self.layers.append(
                LayerWeights(
                    input_norm=state[p + "input_layernorm.weight"],
                    qkv_t=t(qkv),
                    qkv_bias=bias,
                    qk_norm=None
                    if q_norm is None
                    else torch.cat(
                        [
                            pair_halves(q_norm, d).expand(args.num_heads, d),
                            pair_halves(k_norm, d).expand(args.num_kv_heads, d),
                        ]
                    ),
                    o_t=t(state[a + "o_proj.weight"]),
                    o_bias=get(a + "o_proj.bias"),
                    post_norm=state[p + "post_attention_layernorm.weight"],
                    gate_up_t=t(torch.cat([state[m + "gate_proj.weight"], state[m + "up_proj.weight"]])),
                    gate_up_bias=cat(m + "gate_proj.bias", m + "up_proj.bias"),
                    down_t=t(state[m + "down_proj.weight"]),
                    down_bias=get(m + "down_proj.bias"),
                )
            )
        self.embed = state["model.embed_tokens.weight"]
        self.norm = state["model.norm.weight"]
        self.lm_head = self.embed if args.tie_word_embeddings else state["lm_head.weight"]
        self.inv_freq = inv_freq  # (D/2,) fp32, kept out of any dtype cast
        self.rope_scale = scale

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Over the last dim; in fp32 like transformers, then scaled in the model's dtype.

        Computed as a LayerNorm of [x, -x] (mean exactly 0, variance mean(x^2)): LayerNorm
        is one fused kernel on the CPU, where `F.rms_norm` is about six small ones.
        """
        h = x.float()
        n = h.shape[-1]
        normed = F.layer_norm(torch.cat((h, -h), dim=-1), (2 * n,), None, None, self.args.rms_norm_eps)[..., :n]
        return normed.to(x.dtype) * weight

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """(T, 1, D/2) complex rotations for the tokens' positions."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return torch.polar(torch.full_like(angles, self.rope_scale), angles)[:, None, :]

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        batch: AttentionBatch,
        kv: tuple[torch.Tensor, torch.Tensor],  # pool K, V: (layers, num_slots, Hkv, D) each
        logit_rows: torch.Tensor | slice,  # which of the T tokens to return logits for
    ) -> torch.Tensor:
        args = self.args
        t, d, hq, hkv = input_ids.shape[0], args.head_dim, args.num_heads, args.num_kv_heads
        rot = self.rope(positions)
        x = F.embedding(input_ids, self.embed)  # (T, hidden)
        for i, w in enumerate(self.layers):
            qkv = matmul(self.rms_norm(x, w.input_norm), w.qkv_t, w.qkv_bias)  # (T, (Hq + 2 Hkv) D)
            qk = qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d)
            v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
            if w.qk_norm is not None:  # Qwen3: RMSNorm over each head's dims, q and k weights stacked
                qk = self.rms_norm(qk, w.qk_norm)
            qk = rotate(qk, rot)  # q and k heads in one call
            q, k = qk[:, :hq], qk[:, hq:]
            attn = paged_attention(q, k, v, kv[0][i], kv[1][i], batch).reshape(t, hq * d)
            x = torch.addmm(x, attn, w.o_t) if w.o_bias is None else x + matmul(attn, w.o_t, w.o_bias)
            gate, up = matmul(self.rms_norm(x, w.post_norm), w.gate_up_t, w.gate_up_bias).chunk(2, dim=-1)
            h = F.silu(gate) * up
            x = torch.addmm(x, h, w.down_t) if w.down_bias is None else x + matmul(h, w.down_t, w.down_bias)
        x = self.rms_norm(x[logit_rows], self.norm)
        return F.linear(x, self.lm_head).float()  # (len(logit_rows), vocab)

    __call__ = forward

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None, device: str) -> CausalLM:
        """The checkpoint at `path` on `device`, in `dtype` (see `resolve_dtype`)."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
        config = AutoConfig.from_pretrained(path)
        args = ModelArgs.from_hf(config)
        state = CheckpointTensors(path, resolve_dtype(dtype, config, device), device)
        inv_freq, scale = rope_inv_freq(config, args.head_dim)
        return cls(args, state, inv_freq.to(device), scale)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, config: PretrainedConfig, device: str) -> torch.dtype:
    """The serving dtype: `dtype` as given (a name of DTYPES), or None: the checkpoint's own,
    except that an fp32 checkpoint serves in bf16 on CUDA (half the memory and time)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    saved = getattr(config, "dtype", None) or torch.float32
    if not isinstance(saved, torch.dtype):  # a name, as config.json has it
        saved = DTYPES.get(str(saved).removeprefix("torch."), torch.float32)
    return torch.bfloat16 if saved == torch.float32 and str(device).startswith("cuda") else saved


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by name, each read from its safetensors file when asked for, cast
    to `dtype` (floating-point tensors) and moved to `device`; nothing is kept here."""

    def __init__(self, path: Path, dtype: torch.dtype, device: str) -> None:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        self.dtype, self.device = dtype, device
        self.where: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                self.where.update(dict.fromkeys(f.keys(), file))

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        if tensor.is_floating_point():  # cast on the host: the device sees only the serving dtype
            tensor = tensor.to(self.dtype)
        return tensor.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def matmul(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, in) @ w_t (in, out) [+ bias]."""
    return torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE on (T, H, D) with adjacent pairs as complex numbers; rot: (T, 1, D/2)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)
