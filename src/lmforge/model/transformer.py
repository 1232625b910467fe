"""The one backbone: a decoder-only transformer laid out exactly like Hugging Face's LlamaForCausalLM.

Parameter names and shapes match `LlamaForCausalLM` one to one, so export is a rename-free copy. The model knows
nothing of parallelism, precision or compilation; those are applied from outside. A `KVCache` (see
`lmforge.infer.engine`) may be passed to `forward` for incremental decoding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lmforge.infer.engine import KVCache
    from lmforge.recipe import ModelConfig


@dataclass
class ModelArgs:
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    max_seq_len: int
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int) -> ModelArgs:
        """Resolve the `depth` dial: width 64 * depth, one head per 64 channels, SwiGLU hidden ~8/3 width."""
        d_model = cfg.d_model or 64 * cfg.depth
        n_heads = cfg.n_heads or max(1, d_model // 64)
        # 8/3 keeps the SwiGLU MLP's parameter count equal to a 4x GELU MLP; 64 keeps matmuls aligned.
        mlp_hidden = cfg.mlp_hidden or 64 * math.ceil(8 * d_model / (3 * 64))
        return cls(
            vocab_size=vocab_size,
            n_layers=cfg.depth,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=cfg.n_kv_heads or n_heads,
            head_dim=d_model // n_heads,
            mlp_hidden=mlp_hidden,
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=cfg.tie_embeddings,
            rope_theta=cfg.rope_theta,
            norm_eps=cfg.norm_eps,
            init_std=cfg.init_std,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model args {unknown}; known: {sorted(known)}")
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as HF Llama does, so bf16 runs match an export.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None):
    """cos and sin tables [max_seq_len, head_dim] in fp32, laid out for the rotate-half convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.d_model, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer_idx, k, v)
        if start == 0:
            mask, causal = None, True
        elif T == 1:
            # A single new token may see every cached position.
            mask, causal = None, False
        else:
            # A chunk after a cache: query i sits at absolute position start + i and sees keys 0..start + i.
            # SDPA's is_causal aligns the triangle to the top left, which would be wrong here.
            key_pos = torch.arange(start + T, device=x.device)
            query_pos = torch.arange(start, start + T, device=x.device)
            mask, causal = key_pos[None, :] <= query_pos[:, None], False
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.d_model, args.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(args.d_model, args.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(args.mlp_hidden, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.d_model, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.d_model, args.norm_eps)
        self.mlp = MLP(args)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The body, named `model` inside `Transformer` to mirror LlamaModel."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        # Derived from args, so kept out of checkpoints; recomputed by init_weights after meta-device builds.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. With a cache, the tokens continue at position cache.pos."""
        T = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, output projections shrunk by 1/sqrt(2 * n_layers), norms at one."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        nn.init.normal_(self.model.embed_tokens.weight, mean=0.0, std=std)
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.Linear) and not (name == "lm_head" and self.args.tie_embeddings):
                # Residual-branch outputs add up over 2 * n_layers branches; shrinking them keeps the stream's scale.
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding drops the embedding table (and with it a tied lm_head)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.model.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params (lm_head included) + 12 * L * d * T for attention scores."""
        a = self.args
        attn = a.d_model * a.n_heads * a.head_dim * 2 + a.d_model * a.n_kv_heads * a.head_dim * 2
        mlp = 3 * a.d_model * a.mlp_hidden
        matmul_params = a.n_layers * (attn + mlp) + a.vocab_size * a.d_model
        return 6.0 * matmul_params + 12.0 * a.n_layers * a.d_model * seq_len
