"""The one backbone: a decoder-only transformer laid out like Hugging Face's LlamaForCausalLM.

Architecture options (all in `ModelArgs`, resolved from the recipe's `ModelConfig` by `ModelArgs.from_config`):

- `arch="llama"` (default): RMSNorm, rotary positions, no biases. Parameter names and shapes match
  `LlamaForCausalLM` one to one, so export is a rename-free copy. `qk_norm` adds `self_attn.q_norm` / `k_norm`
  (RMSNorm over head_dim, shared by the heads), the names and placement of `Qwen3ForCausalLM`.
- `arch="gpt2"`: LayerNorm with bias, learned absolute positions (`model.embed_positions`, max_seq_len rows), biases
  on every projection, tied embeddings. The same module names as llama arch are kept (q/k/v/o_proj, up/down_proj,
  input_layernorm, post_attention_layernorm, model.norm); `lmforge.hf` fuses and transposes them into GPT-2's layout.
- `mlp`: "swiglu" (gated SiLU: gate_proj, up_proj, down_proj), or ungated `down_proj(act(up_proj(x)))` with
  act = relu(x)**2 ("relu2") or tanh-approximated GELU ("gelu", the gpt2 arch's MLP).
- `logit_softcap`: logits = cap * tanh(logits / cap), computed in fp32.
- `attn_bias` (llama arch): "qkv" gives q/k/v_proj biases (Qwen2's layout), "qkvo" o_proj's too (Llama's
  attention_bias=True); the gpt2 arch always has biases.
- `rope_scaling`: None, or a "linear" / "llama3" rescaling of the rotary frequencies (see `lmforge.model.rope`).
- `zero_init_out`: o_proj, down_proj (and an untied lm_head) start at zero.

The model computes in its parameters' dtype (bf16 weights give bf16 activations), norms in fp32, as transformers
does. The rotary tables cover the first min(max_seq_len, ROPE_TABLE_START) positions and grow on demand up to
max_seq_len, so a model declaring a 131k-token context costs no 131k-row tables until it sees such a sequence.

Attention kinds (`forward(attn=...)`): "causal", "bidirectional", "prefix" (prefix-LM with per-row `prefix_len`),
each optionally restricted to tokens of the same document (`doc_ids`, for packed sequences). Positions are always
the absolute row positions 0..T-1: document masking does not restart rotary or learned positions.

The model knows nothing of parallelism, precision, activation checkpointing or compilation; those are applied from
outside (see `lmforge.train.activation_checkpointing`). A `KVCache` (see `lmforge.model.kv_cache`) may be passed
to `forward` for incremental decoding (causal attention only); a `SlotKVCache` continues each row at its own
position, with its own rotary/learned positions and a mask over its own filled slots (continuous batching).

Prefix tuning hooks in through one plain attribute: when `Attention.prefix_kv` is set (by
`lmforge.model.prefix`), its P learned keys/values are prepended on every call and every query sees them, under
any attention kind, document mask or cache path. They are not rotated and not stored in the cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.rope import apply_rope, check_rope_scaling, rope_tables

if TYPE_CHECKING:
    from collections.abc import Callable

    from lmforge.model.kv_cache import KVCache
    from lmforge.model.config import ModelConfig


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
    # Defaults reproduce the original Llama-layout model, so checkpoints written before these fields existed load.
    arch: Literal["llama", "gpt2"] = "llama"
    mlp: Literal["swiglu", "relu2", "gelu"] = "swiglu"  # resolved: the recipe's swiglu becomes gelu for gpt2 arch
    qk_norm: bool = False
    logit_softcap: float | None = None
    zero_init_out: bool = False
    attn_bias: Literal["none", "qkv", "qkvo"] = "none"
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"arch={self.arch!r}; choose 'llama' or 'gpt2'")
        if self.mlp not in ("swiglu", "relu2", "gelu"):
            raise ValueError(f"mlp={self.mlp!r}; choose 'swiglu', 'relu2' or 'gelu'")
        if self.arch == "gpt2" and not self.tie_embeddings:
            raise ValueError("arch='gpt2' always ties lm_head to the token embeddings; set tie_embeddings=True")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive or None, got {self.logit_softcap}")
        if self.attn_bias not in ("none", "qkv", "qkvo"):
            raise ValueError(f"attn_bias={self.attn_bias!r}; choose 'none', 'qkv' or 'qkvo'")
        if self.arch == "gpt2" and (self.attn_bias != "none" or self.rope_scaling is not None):
            raise ValueError("arch='gpt2' has biases everywhere and learned positions: leave attn_bias='none' and "
                             "rope_scaling=None")  # fmt: skip
        check_rope_scaling(self.rope_scaling)

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int) -> ModelArgs:
        """Resolve the `depth` dial: width 64 * depth, one head per 64 channels, SwiGLU hidden ~8/3 width.

        An ungated MLP (gpt2 arch, or mlp=relu2) gets hidden 4 * width. The gpt2 arch uses the GELU MLP unless
        mlp=relu2 asks for squared ReLU, and always ties its embeddings.
        """
        d_model = cfg.d_model or 64 * cfg.depth
        n_heads = cfg.n_heads or max(1, d_model // 64)
        mlp = cfg.mlp
        if cfg.arch == "gpt2" and mlp == "swiglu":
            mlp = "gelu"
        # 8/3 keeps the SwiGLU MLP's parameter count equal to a 4x GELU MLP; 64 keeps matmuls aligned.
        default_hidden = 64 * math.ceil(8 * d_model / (3 * 64)) if mlp == "swiglu" else 4 * d_model
        mlp_hidden = cfg.mlp_hidden or default_hidden
        return cls(
            vocab_size=vocab_size,
            n_layers=cfg.depth,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=cfg.n_kv_heads or n_heads,
            head_dim=d_model // n_heads,
            mlp_hidden=mlp_hidden,
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=cfg.tie_embeddings or cfg.arch == "gpt2",
            rope_theta=cfg.rope_theta,
            norm_eps=cfg.norm_eps,
            init_std=cfg.init_std,
            arch=cfg.arch,
            mlp=mlp,
            qk_norm=cfg.qk_norm,
            logit_softcap=cfg.logit_softcap,
            zero_init_out=cfg.zero_init_out,
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


# Rotary table rows built up front; a longer sequence grows them (Transformer.rope).
ROPE_TABLE_START = 4096

ATTENTION_KINDS = ("causal", "bidirectional", "prefix")


def attention_mask(
    attn: str,
    seq_len: int,
    *,
    prefix_len: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """The (attn_mask, is_causal) pair for SDPA; a boolean mask is [B, 1, T, T] with True = may attend.

    Plain causal and bidirectional attention need no mask (SDPA's fast paths). "prefix": query i sees key j when
    j < prefix_len[b] or j <= i. `doc_ids` [B, T] further limits every query to keys of its own document. Every
    query always sees itself, so no row is fully masked and no padding mask is needed.
    """
    if attn not in ATTENTION_KINDS:
        raise ValueError(f"attn={attn!r}; choose one of {ATTENTION_KINDS}")
    if (attn == "prefix") != (prefix_len is not None):
        raise ValueError("prefix_len [B] must be given with attn='prefix', and only then")
    if doc_ids is None and attn != "prefix":
        return None, attn == "causal"
    if device is None:
        device = (doc_ids if doc_ids is not None else prefix_len).device  # type: ignore[union-attr]
    pos = torch.arange(seq_len, device=device)
    mask: torch.Tensor | None = None
    if attn != "bidirectional":
        mask = (pos[None, :] <= pos[:, None])[None]  # [1, T, T]
    if attn == "prefix":
        assert prefix_len is not None
        if prefix_len.dim() != 1:
            raise ValueError(f"prefix_len must be a LongTensor [B], got shape {tuple(prefix_len.shape)}")
        in_prefix = pos[None, None, :] < prefix_len.to(device)[:, None, None]  # [B, 1, T] over keys
        mask = mask | in_prefix
    if doc_ids is not None:
        if doc_ids.shape[-1] != seq_len or doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [B, {seq_len}], got shape {tuple(doc_ids.shape)}")
        doc_ids = doc_ids.to(device)
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
        mask = same if mask is None else mask & same
    assert mask is not None
    return mask[:, None], False


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.arch == "gpt2" or args.attn_bias != "none"
        self.q_proj = nn.Linear(args.d_model, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=bias)
        o_bias = args.arch == "gpt2" or args.attn_bias == "qkvo"
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=o_bias)
        if args.qk_norm:
            # One weight of size head_dim shared by all heads, applied before rope (Qwen3's q_norm / k_norm).
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm
        # batch_size -> (k, v) [B, n_kv_heads, P, head_dim]. A plain attribute, not a submodule: the owner of the
        # prefix registers its parameters elsewhere, and this module's state dict never changes.
        self.prefix_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Without a cache, (mask, causal) come from `attention_mask`; cos/sin are None for learned positions."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None and cache.per_row:
            k, v = cache.update(self.layer_idx, k, v)
            mask, causal = cache.attn_mask(T)
        elif cache is not None:
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
        if self.prefix_kv is not None:
            k, v, mask = self._prepend_prefix(k, v, mask, causal)
            causal = False
        return self.attend(q, k, v, mask, causal)

    def project(self, x: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """x [B, T, d_model] -> q [B, n_heads, T, D], k and v [B, n_kv_heads, T, D]: projected, q/k normed (qk_norm)
        and rotated (cos/sin broadcastable to [.., T, D]; None for learned positions)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cos is not None and sin is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:  # fmt: skip
        """SDPA of q [B, n_heads, T, D] over k/v [B, n_kv_heads, S, D], then the output projection: [B, T, d]."""
        B, _, T, _ = q.shape
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _prepend_prefix(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Put the prefix's P keys/values before k/v [B, H, S, D] and give every mask row P leading Trues.

        (mask, causal) is never (a mask, True): a causal call has no mask yet, so its triangle (aligned top left,
        like SDPA's, with S queries here) is made explicit to grow the prefix columns. No mask stays no mask."""
        assert self.prefix_kv is not None
        pk, pv = self.prefix_kv(k.shape[0])
        S = k.shape[2]
        if causal:
            mask = torch.ones(S, S, dtype=torch.bool, device=k.device).tril()
        if mask is not None:
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], pk.shape[2]), mask], dim=-1)
        # Cast to the activations' dtype (bf16 under autocast) so q, k and v agree.
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2), mask


class MLP(nn.Module):
    """swiglu: down_proj(silu(gate_proj(x)) * up_proj(x)); relu2 / gelu: down_proj(act(up_proj(x))), ungated."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.kind = args.mlp
        bias = args.arch == "gpt2"
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(args.d_model, args.mlp_hidden, bias=bias)
        self.up_proj = nn.Linear(args.d_model, args.mlp_hidden, bias=bias)
        self.down_proj = nn.Linear(args.mlp_hidden, args.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        h = F.relu(h).square() if self.kind == "relu2" else F.gelu(h, approximate="tanh")
        return self.down_proj(h)


def make_norm(args: ModelArgs, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=args.norm_eps) if args.arch == "gpt2" else RMSNorm(dim, args.norm_eps)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(args, args.d_model)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = make_norm(args, args.d_model)
        self.mlp = MLP(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The body, named `model` inside `Transformer` to mirror LlamaModel."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model)
        if args.arch == "gpt2":
            self.embed_positions = nn.Embedding(args.max_seq_len, args.d_model)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = make_norm(args, args.d_model)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = args.arch == "llama"
        if self.rotary:
            # Derived from args, so kept out of checkpoints; rebuilt by build_rope after meta-device builds.
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # A meta-device build receives its weights next (lmforge.model.hf_import): initialising them is wasted, and
        # the first random init on meta costs a second of lazy torch imports.
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attn: str = "causal",
        prefix_len: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32 when logit_softcap is set), or with return_hidden the
        final normed hidden states [B, T, d_model].

        attn: "causal" | "bidirectional" | "prefix" (key j visible to query i if j < prefix_len[b] or j <= i;
        prefix_len a LongTensor [B]). doc_ids [B, T]: a token attends only within its own document, on top of the
        attention kind. Positions are the absolute row positions (not restarted per document). With a cache (causal
        attention only), the tokens continue at position cache.pos. last_only: the last position only ([B, 1, ...]).
        """
        T = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        if cache is not None and (attn != "causal" or prefix_len is not None or doc_ids is not None):
            raise ValueError("a KV cache supports plain causal attention only (no attn kind, prefix_len or doc_ids)")
        mask, causal = attention_mask(attn, T, prefix_len=prefix_len, doc_ids=doc_ids, device=input_ids.device)
        if cache is not None and cache.per_row and not cache.aligned:  # each row continues at its own position
            positions = cache.positions(T)
            x = self.embed(input_ids, positions=positions)
            cos, sin = self.rope_at(positions, start + T)
        else:
            x = self.embed(input_ids, start)
            cos, sin = self.rope(start, T)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache=cache, mask=mask, causal=causal)
        if cache is not None:
            cache.advance(T)
        if last_only:  # a prefill needs the last position's logits only: the output layer runs on that row alone
            x = x[:, -1:]
        return self.model.norm(x) if return_hidden else self.head(x)

    # The forward's parts, which a pipeline stage (lmforge.train.pipelining) runs for its share of the model.

    def embed(self, input_ids: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, plus learned position embeddings (gpt2 arch) for positions start, start + 1, ...
        (or the given per-row `positions` [B, T])."""
        x = self.model.embed_tokens(input_ids)
        if self.rotary:
            return x
        if positions is None:
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return x + self.model.embed_positions(positions)

    def rope(self, start: int, length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rotary tables (cos, sin) of positions start..start + length; (None, None) without rotary positions."""
        if not self.rotary:
            return None, None
        if start + length > self.rope_cos.shape[0]:
            # At least double, so a growing generation rebuilds the tables O(log n) times.
            self.build_rope(min(self.args.max_seq_len, max(start + length, 2 * self.rope_cos.shape[0])))
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def rope_at(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rotary tables [B, 1, T, D] of per-row positions [B, T] (all below `end`); (None, None) without."""
        if not self.rotary:
            return None, None
        self.rope(0, end)  # grows the tables to cover `end`
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def build_rope(self, length: int | None = None, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary tables for positions 0..length-1 (default: min(max_seq_len, ROPE_TABLE_START))
        on `device` (default: where they are); a model built on the meta device gets real tables this way."""
        a = self.args
        length = min(a.max_seq_len, ROPE_TABLE_START) if length is None else length
        device = self.rope_cos.device if device is None else device
        self.rope_cos, self.rope_sin = rope_tables(a.head_dim, length, a.rope_theta, a.rope_scaling, device)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output -> logits: final norm, output layer and, when set, the logit soft cap (fp32)."""
        logits = self.lm_head(self.model.norm(x))
        cap = self.args.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, output projections shrunk by 1/sqrt(2 * n_layers) (or zero with
        zero_init_out, which also zeroes an untied lm_head), biases at zero, norms at one."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        nn.init.normal_(self.model.embed_tokens.weight, mean=0.0, std=std)
        if not self.rotary:
            nn.init.normal_(self.model.embed_positions.weight, mean=0.0, std=std)
        for name, module in self.named_modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and not (name == "lm_head" and self.args.tie_embeddings):
                # Residual-branch outputs add up over 2 * n_layers branches; shrinking them keeps the stream's scale.
                is_out = name.endswith(("o_proj", "down_proj"))
                if self.args.zero_init_out and (is_out or name == "lm_head"):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.rotary:
            self.build_rope()

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding drops the embedding tables (token and learned position; with them a
        tied lm_head)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.model.embed_tokens.weight.numel()
            if not self.rotary:
                total -= self.model.embed_positions.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params (lm_head included) + 12 * L * d * T for attention scores.

        The MLP has 3 matrices when gated (swiglu) and 2 when not (gelu, relu2). Biases, norms, activations and
        position embeddings (lookups) are not matmuls and are left out.
        """
        a = self.args
        attn = a.d_model * a.n_heads * a.head_dim * 2 + a.d_model * a.n_kv_heads * a.head_dim * 2
        mlp = (3 if a.mlp == "swiglu" else 2) * a.d_model * a.mlp_hidden
        matmul_params = a.n_layers * (attn + mlp) + a.vocab_size * a.d_model
        return 6.0 * matmul_params + 12.0 * a.n_layers * a.d_model * seq_len
