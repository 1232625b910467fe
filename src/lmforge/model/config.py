"""Settings of the model a recipe builds (the `model` section)."""

from __future__ import annotations

from pydantic import Field, model_validator
from typing import Literal

from lmforge.settings import Section


class ModelConfig(Section):
    # A pre-trained model to start from: a Hugging Face model directory (config.json + safetensors), a hub id
    # already in the local Hugging Face cache, or an lmforge checkpoint. Its architecture and tokenizer replace
    # every setting below; the recipe's default stages then import it instead of training a tokenizer and a model
    # (add pretrain to the stages to continue pre-training it on the recipe's data). See docs/import.md.
    init_from: str | None = None
    # One dial: depth sets the number of blocks, and (unless overridden) width = 64 * depth and heads = width / 64.
    depth: int = Field(4, ge=1, le=128)
    d_model: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)  # < n_heads gives grouped-query attention
    mlp_hidden: int | None = Field(None, gt=0)
    max_seq_len: int = Field(256, gt=0)
    tie_embeddings: bool = False
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    # "llama": RMSNorm, rotary positions, gated MLP, no biases (exports as LlamaForCausalLM). "gpt2": the classic
    # reference (LayerNorm, learned positions, GELU MLP of 4x width, biases, tied embeddings).
    arch: Literal["llama", "gpt2"] = "llama"
    mlp: Literal["swiglu", "relu2"] = "swiglu"  # llama arch: gated SiLU, or squared ReLU (4x width, ungated)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention
    logit_softcap: float | None = Field(None, gt=0)  # cap * tanh(logits / cap); None = off
    zero_init_out: bool = False  # output projections (o_proj, down_proj) and lm_head start at zero

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        width = self.d_model or 64 * self.depth
        heads = self.n_heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"d_model={width} must be divisible by n_heads={heads}")
        if (width // heads) % 2:
            raise ValueError(f"head dim {width // heads} must be even for rotary embeddings")
        if self.n_kv_heads is not None and heads % self.n_kv_heads:
            raise ValueError(f"n_heads={heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        return self
