"""A compact decoder (Llama / Qwen2 family) with a position-indexed KV cache.

Why not run transformers' modules directly: speculative decoding calls the
model thousands of times per request with 1..16 new tokens, so per-call
overhead and cache rollback dominate. Here, as in gpt-fast, the KV cache is a
preallocated buffer indexed by position: rolling a request back to its
verified prefix is just a smaller `length`, the next forward overwrites the
rejected slots. q/k/v and gate/up projections are fused to halve the number of
matmul launches. Weights come from a transformers model (GGUF dequantised by
transformers), so numerics match its reference implementation.

CPU kernels (measured on this project's 2-core AVX-512 machines, no native
bfloat16): a one- or two-row matmul is memory bound and fastest as
`x @ W^T` over a bfloat16, transposed-contiguous copy of W (2.2 ms for a
1536x17920 weight against 5.2 ms in float32); a verification of 3..16 rows is
fastest through oneDNN with a prepacked float32 copy (6-9 ms against 11-16 ms
for plain float32 and 10-20 ms for bfloat16). `FastLinear` keeps both copies
of the same (dtype-rounded) weights and picks per call, so a bfloat16 model
decodes in bfloat16 and verifies in float32 arithmetic over bfloat16 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderShape:
    """Architecture numbers read from a transformers config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    max_positions: int

    @classmethod
    def from_hf_config(cls, config) -> DecoderShape:
        if config.model_type not in ("llama", "qwen2"):
            raise ValueError(f"unsupported architecture {config.model_type!r} (supported: llama, qwen2)")
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"unsupported rope scaling {rope_type!r}")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            max_positions=config.max_position_embeddings,
        )


class KVCache:
    """Keys and values of one sequence for every layer.

    Invariant: slots [0, length) hold the keys/values of the tokens the owner
    has committed to this cache; slots past `length` are garbage and are
    overwritten by the next forward. Capacity grows by doubling.
    """

    def __init__(self, shape: DecoderShape, dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.shape = shape
        self.length = 0
        # [layers, 2 (k, v), kv_heads, capacity, head_dim]
        self.buffer = torch.empty(
            shape.num_layers, 2, shape.num_kv_heads, capacity, shape.head_dim, dtype=dtype, device=device
        )

    @property
    def capacity(self) -> int:
        return self.buffer.shape[3]

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        grown = self.buffer.new_empty(*self.buffer.shape[:3], capacity, self.buffer.shape[4])
        grown[:, :, :, : self.length] = self.buffer[:, :, :, : self.length]
        self.buffer = grown

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


BATCH_ROWS = 3  # from this many rows on, a CPU matmul goes through the prepacked float32 weight
PACK_MIN_ELEMENTS = 1 << 20  # oneDNN's per-call overhead (~70 us) only pays off on large weights


def _onednn_available() -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(2, 2), 1)
        return True
    except (RuntimeError, AttributeError):
        return False


class FastLinear(nn.Module):
    """y = x W^T + b, with the fastest kernel for the number of rows (see the module docstring).

    Rows in the model's dtype multiply a transposed copy in that dtype; float32 rows (a
    verification batch) go through the prepacked copy when the weight is large, else through a
    small transposed float32 copy. Invariant: every copy holds the same values, W rounded to
    `dtype`; a float32 model shares one copy between both paths.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                 pack: bool):
        super().__init__()
        rounded = weight.to(dtype)
        self.packed = None
        if pack and weight.numel() >= PACK_MIN_ELEMENTS:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(rounded.float(), 8)
        self.bias = None if bias is None else bias.to(dtype).to(device)
        self.bias32 = None if bias is None else self.bias.float()
        rows_copy = self.packed is None or dtype != torch.float32
        self.weight_t = rounded.t().contiguous().to(device) if rows_copy else None  # [in, out]
        self.weight_t32 = None
        if self.packed is None and self.weight_t is not None:
            self.weight_t32 = self.weight_t if dtype == torch.float32 else self.weight_t.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if self.packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias32, "none", [], "")
            weight, bias = self.weight_t32, self.bias32
        else:
            weight, bias = self.weight_t, self.bias
        y = x @ weight
        return y if bias is None else y + bias


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, shape: DecoderShape, weights: dict[str, torch.Tensor], make_linear):
        super().__init__()
        self.shape = shape
        self.attn_norm = RMSNorm(weights["attn_norm"], shape.rms_norm_eps)
        self.wqkv = make_linear(weights["wqkv"], weights.get("wqkv_bias"))
        self.wo = make_linear(weights["wo"], None)
        self.mlp_norm = RMSNorm(weights["mlp_norm"], shape.rms_norm_eps)
        self.w_gate_up = make_linear(weights["w_gate_up"], None)
        self.w_down = make_linear(weights["w_down"], None)

    def forward(self, x, cos, sin, kv: torch.Tensor, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [n, hidden]; cos/sin: [n, head_dim]; kv: [2, kv_heads, capacity, head_dim] (this layer's slice)
        s = self.shape
        n = x.shape[0]
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], -1)
        q = q.view(n, s.num_heads, s.head_dim).transpose(0, 1)  # [heads, n, hd]
        k = k.view(n, s.num_kv_heads, s.head_dim).transpose(0, 1)
        v = v.view(n, s.num_kv_heads, s.head_dim).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv[0, :, start : start + n] = k
        kv[1, :, start : start + n] = v
        keys = kv[0, :, : start + n].to(x.dtype)
        values = kv[1, :, : start + n].to(x.dtype)
        attn = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, enable_gqa=True
        )
        x = x + self.wo(attn[0].transpose(0, 1).reshape(n, -1))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class Decoder(nn.Module):
    """Causal LM forward over new tokens appended to a KV cache."""

    def __init__(self, shape: DecoderShape, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.shape = shape
        self.dtype = dtype
        self.device = device
        pack = device.type == "cpu" and _onednn_available()

        def make_linear(weight, bias):
            return FastLinear(weight, bias, dtype, device, pack)

        def cast(t):
            return t.to(dtype).to(device)

        self.embed = nn.Embedding.from_pretrained(cast(weights["embed"]), freeze=True)
        self.blocks = nn.ModuleList(
            Block(shape, {k: cast(v) if k.endswith("norm") else v for k, v in layer.items()}, make_linear)
            for layer in weights["layers"]
        )
        self.norm = RMSNorm(cast(weights["norm"]), shape.rms_norm_eps)
        self.lm_head = make_linear(weights["lm_head"], None)
        self.batch_rows = BATCH_ROWS if pack else None
        exponents = torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=device) / shape.head_dim
        self.inv_freq = 1.0 / (shape.rope_theta**exponents)
        self._rope_cos = torch.empty(0, device=device)
        self._rope_sin = torch.empty(0, device=device)

    def _rope(self, start: int, n: int, positions: torch.Tensor | None,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, head_dim] for positions start..start+n-1, or for explicit `positions`."""
        needed = start + n if positions is None else int(positions.max()) + 1
        if self._rope_cos.shape[0] < needed:
            size = max(2 * needed, 1024)
            t = torch.arange(size, dtype=torch.float32, device=self.device)
            emb = torch.outer(t, self.inv_freq).repeat(1, 2)
            self._rope_cos, self._rope_sin = emb.cos(), emb.sin()
        if positions is None:
            return self._rope_cos[start : start + n].to(dtype), self._rope_sin[start : start + n].to(dtype)
        return self._rope_cos[positions].to(dtype), self._rope_sin[positions].to(dtype)

    def new_cache(self) -> KVCache:
        return KVCache(self.shape, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache: KVCache, num_logits: int,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Write `token_ids` ([n] long) into cache slots [cache.length, cache.length + n) and return float32
        logits of the last `num_logits` rows ([num_logits, vocab]); advances `cache.length` by n.

        By default row j sits at position cache.length + j and sees every earlier slot (a causal
        continuation). A token tree passes its own `positions` ([n] long) and `mask`
        ([n, cache.length + n] bool, True where a row may attend).
        """
        n = token_ids.shape[0]
        start = cache.length
        cache.reserve(start + n)
        # batches of rows compute in float32 over prepacked weights (see FastLinear)
        act = torch.float32 if self.batch_rows is not None and n >= self.batch_rows else self.dtype
        cos, sin = self._rope(start, n, positions, act)
        if mask is None and n > 1:
            # row j (position start + j) sees every cached slot and the new tokens up to itself
            mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(diagonal=start)
        x = self.embed(token_ids).to(act)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.buffer[layer], start, mask)
        cache.length = start + n
        return self.lm_head(self.norm(x[n - num_logits :])).float()

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype, device: torch.device) -> Decoder:
        """Build from a transformers Llama/Qwen2 model, fusing its projections."""
        shape = DecoderShape.from_hf_config(hf_model.config)
        sd = hf_model.state_dict()
        layers = []
        for i in range(shape.num_layers):
            p = f"model.layers.{i}."
            layer = {
                "wqkv": torch.cat([sd[f"{p}self_attn.{name}_proj.weight"] for name in "qkv"]),
                "wo": sd[f"{p}self_attn.o_proj.weight"],
                "attn_norm": sd[f"{p}input_layernorm.weight"],
                "mlp_norm": sd[f"{p}post_attention_layernorm.weight"],
                "w_gate_up": torch.cat([sd[f"{p}mlp.gate_proj.weight"], sd[f"{p}mlp.up_proj.weight"]]),
                "w_down": sd[f"{p}mlp.down_proj.weight"],
            }
            if shape.qkv_bias:
                layer["wqkv_bias"] = torch.cat([sd[f"{p}self_attn.{name}_proj.bias"] for name in "qkv"])
            layers.append(layer)
        weights = {
            "embed": sd["model.embed_tokens.weight"],
            "norm": sd["model.norm.weight"],
            "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
            "layers": layers,
        }
        return cls(shape, weights, dtype, device).eval()
