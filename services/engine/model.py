"""A compact decoder (Llama / Mistral / Qwen2 / Qwen3) with a position-indexed KV cache and row-invariant numerics.

Why not run transformers' modules directly: speculative decoding calls the
model thousands of times per request with 1..16 new tokens, so per-call
overhead and cache rollback dominate. Here, as in gpt-fast, the KV cache is a
preallocated buffer indexed by position: rolling a request back to its
verified prefix is just a smaller `length`, the next forward overwrites the
rejected slots. q/k/v and gate/up projections are fused to halve the number of
matmul launches. Weights come from a transformers model (GGUF dequantised by
transformers).

Numerics: the result for a row is bitwise the same however many rows the
forward has and whatever they are, so a verification, a token tree and a
one-token step give the target the same logits, and greedy speculative output
is plain decoding's to the last bit, in every dtype. Weights keep the model's
dtype (their values are rounded to it); activations, the residual stream, the
KV cache and attention are float32. Each matmul runs through the kernel
measured fastest among the row-invariant ones on this machine
(`services.engine.kernels`), attention through `services.engine.attention`,
and the other operations are elementwise ones or row-wise reductions whose
result for a row does not depend on where the row sits: SiLU is written as
x / (1 + exp(-x)) because torch's vectorised `silu` computes the scalar tail of
a buffer differently from its vector body (measured for widths that are not a
multiple of the vector block: a row's values would depend on the row count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from services.engine.attention import RowLayout, Rows, attend
from services.engine.kernels import MAX_ROWS, TAIL_KEYS, ChosenLinear, KernelChoice, kernel_choices, values_dtype

# Architectures the decoder computes itself: Llama's block, with Qwen2's q/k/v biases and Qwen3's q/k norms.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants whose frequencies are fixed at load time (transformers computes them); `dynamic` and `longrope`
# change them with the sequence length and are refused.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def sliding_window(config) -> int | None:
    """The attention window a config uses, if any: Mistral and Phi-3 whenever they name one, Qwen only with
    `use_sliding_window`. Within it the window masks nothing, so a model is served up to it and stays exact."""
    window = getattr(config, "sliding_window", None)
    return window if window and getattr(config, "use_sliding_window", True) else None


class UnsupportedModel(ValueError):
    """The fast decoder cannot compute this model exactly (another architecture, a RoPE it lacks, ...)."""


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
    rope_inv_freq: tuple[float, ...]  # [head_dim / 2] rotation frequencies, float32 values
    rope_attention_factor: float  # cos and sin are multiplied by it (yarn's attention factor; 1.0 otherwise)
    qk_norm: bool  # Qwen3: an RMSNorm over each head of q and k before RoPE
    max_positions: int

    @property
    def kv_bytes_per_token(self) -> int:
        """The KV cache's float32 keys and values of every layer, for one position."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_hf_config(cls, config) -> DecoderShape:
        """The shape of a Llama, Mistral, Qwen2 or Qwen3 config; UnsupportedModel (saying why) for others.

        Sliding-window attention masks nothing while a sequence fits in the window, so a model with one is
        served with its context window capped to the window: every position it computes is exact."""
        if config.model_type not in ARCHITECTURES:
            raise UnsupportedModel(f"architecture {config.model_type!r} is not in the fast decoder "
                                   f"(it has {', '.join(ARCHITECTURES)})")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        inv_freq, scaling = _rope_frequencies(config, head_dim)
        window = sliding_window(config)
        max_positions = min(config.max_position_embeddings, window or config.max_position_embeddings)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_inv_freq=inv_freq,
            rope_attention_factor=scaling,
            qk_norm=config.model_type == "qwen3",
            max_positions=max_positions,
        )


def _rope_frequencies(config, head_dim: int) -> tuple[tuple[float, ...], float]:
    """(inverse frequencies, cos/sin scaling) of the config's RoPE, as transformers computes them."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise UnsupportedModel(f"RoPE scaling {rope_type!r} is not in the fast decoder (it has "
                               f"{', '.join(STATIC_ROPE)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel("partial rotary embeddings are not in the fast decoder")
    if rope_type == "default":
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return tuple(inv_freq.float().tolist()), float(scaling)


class KVCache:
    """Keys and values of one sequence for every layer, in float32.

    Invariant: slots [0, length) hold the keys/values of the tokens the owner
    has committed to this cache; slots past `length` hold finite values (zeros or
    an earlier forward's rows) and are overwritten by the next forward. Finite,
    because attention multiplies masked slots by exactly zero. Capacity grows by
    doubling.
    """

    def __init__(self, shape: DecoderShape, device: torch.device, capacity: int = 256):
        self.shape = shape
        self.length = 0
        # [layers, 2 (k, v), kv_heads, capacity, head_dim]
        self.buffer = torch.zeros(shape.num_layers, 2, shape.num_kv_heads, capacity, shape.head_dim, device=device)

    @property
    def capacity(self) -> int:
        return self.buffer.shape[3]

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        grown = self.buffer.new_zeros(*self.buffer.shape[:3], capacity, self.buffer.shape[4])
        grown[:, :, :, : self.length] = self.buffer[:, :, :, : self.length]
        self.buffer = grown

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def copy_prefix(self, source: KVCache, length: int) -> None:
        """Hold the first `length` tokens `source` holds: the same keys and values, copied."""
        self.reserve(length)
        with torch.inference_mode():  # either buffer may have been (re)allocated inside a forward
            self.buffer[:, :, :, :length] = source.buffer[:, :, :, :length]
        self.length = length

    def keep(self, start: int, slots: list[int]) -> None:
        """Move the keys and values of `slots` (each at or past `start`, in increasing order) to `start`,
        `start` + 1, ...; the cache then holds `start` + len(slots) tokens (a tree's verified path)."""
        index = torch.tensor(slots, device=self.buffer.device)
        with torch.inference_mode():  # the buffer may have been (re)allocated inside a forward
            self.buffer[:, :, :, start : start + len(slots)] = self.buffer[:, :, :, index]
        self.length = start + len(slots)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = weight.float()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, shape: DecoderShape, weights: dict[str, torch.Tensor], make_linear, quantum: int):
        super().__init__()
        self.shape = shape
        self.quantum = quantum  # attention's query rows per GEMM are padded to a multiple of this
        self.scale = shape.head_dim ** -0.5
        self.attn_norm = RMSNorm(weights["attn_norm"], shape.rms_norm_eps)
        self.wqkv = make_linear(weights["wqkv"], weights.get("wqkv_bias"))
        self.wo = make_linear(weights["wo"], weights.get("wo_bias"))
        self.q_norm = RMSNorm(weights["q_norm"], shape.rms_norm_eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(weights["k_norm"], shape.rms_norm_eps) if shape.qk_norm else None
        self.mlp_norm = RMSNorm(weights["mlp_norm"], shape.rms_norm_eps)
        self.w_gate_up = make_linear(weights["w_gate_up"], weights.get("w_gate_up_bias"))
        self.w_down = make_linear(weights["w_down"], weights.get("w_down_bias"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[torch.Tensor],
                rows: Rows) -> torch.Tensor:
        """x: [rows, hidden] float32, the rows of every request one after the other; cos/sin: [rows, head_dim];
        `caches`: each request's cache of this layer [2, kv_heads, capacity, head_dim], `rows` where its rows
        sit. Matmuls and norms run over all rows at once; attention reads each request's own cache."""
        s = self.shape
        n = x.shape[0]
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], -1)
        q = q.view(n, s.num_heads, s.head_dim)
        k = k.view(n, s.num_kv_heads, s.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = (q * cos[:, None] + _rotate_half(q) * sin[:, None]) * self.scale
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        new = torch.stack((k, v.view(n, s.num_kv_heads, s.head_dim))).transpose(1, 2)  # [2, kv_heads, n, head_dim]
        first = 0
        for kv, layout in zip(caches, rows.layouts, strict=True):
            count, start = len(layout.positions), layout.start
            kv[:, :, start : start + count] = new[:, :, first : first + count]
            first += count
        x = x + self.wo(attend(q, caches, rows, self.quantum))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(gate / (1.0 + torch.exp(-gate)) * up)


def causal_chunks(tokens: list[int], num_logits: int) -> list[tuple[list[int], int]]:
    """A causal continuation in steps of at most MAX_ROWS rows, each with the number of its rows that are
    among the last `num_logits` (whose logits are wanted)."""
    n = len(tokens)
    return [(tokens[begin : begin + MAX_ROWS], max(0, min(MAX_ROWS, n - begin) - max(0, n - num_logits - begin)))
            for begin in range(0, n, MAX_ROWS)]


@dataclass
class Segment:
    """Rows of one request in a batched forward: at most MAX_ROWS tokens appended to its cache (a linear
    continuation, or a token tree with `parents`), and how many of its last rows want logits."""

    token_ids: list[int]
    cache: KVCache
    num_logits: int
    parents: list[int] | None = None


class CausalDecoder(nn.Module):
    """What a level runs: `step` (one forward over the rows of several requests, each with its own cache) and
    `new_cache`; `shape` gives at least `vocab_size` and `max_positions`. This decoder's own forward over a
    Llama-family model, or transformers' modeling of any other causal LM (`services.engine.fallback`)."""

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache, num_logits: int,
                parents: list[int] | None = None) -> torch.Tensor:
        """Write `token_ids` ([n] long) into cache slots [cache.length, cache.length + n) and return float32
        logits of the last `num_logits` rows ([num_logits, vocab]); advances `cache.length` by n.

        By default row j continues row j - 1 (a causal continuation at position cache.length + j). A token
        tree passes `parents` (one per row: the row it continues, -1 for the committed sequence): a row sees
        the committed slots, its ancestors and itself, and sits at position cache.length + its depth.
        A causal continuation of more than MAX_ROWS rows is computed in chunks of MAX_ROWS (a tree and
        the rows before it must fit in one)."""
        tokens = token_ids.tolist()
        n = len(tokens)
        if parents is not None and n > MAX_ROWS:
            raise ValueError(f"a token tree with the rows before it must fit in one forward of {MAX_ROWS} rows")
        outs = [self.step([Segment(chunk, cache, wanted, parents)])[0]
                for chunk, wanted in causal_chunks(tokens, num_logits)]
        return torch.cat([out for out in outs if out is not None])


class Decoder(CausalDecoder):
    """Causal LM forward over new tokens appended to a KV cache."""

    def __init__(self, shape: DecoderShape, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.shape = shape
        self.dtype = dtype
        self.device = device
        choices = kernel_choices()
        chosen: dict[tuple, KernelChoice] = {}
        dense = values_dtype(dtype)  # int8, int4: the block matmuls only; embeddings, norms, LM head in bfloat16

        def make_linear(weight, bias, float_output: bool = False, kind: torch.dtype = dtype):
            # per weight, not per shape: a weight float16 cannot hold has a choice of its own (see kernels.FP16)
            choice = chosen[(*weight.shape, kind)] = choices.linear(weight, kind, device, float_output)
            return ChosenLinear(weight, bias, kind, device, choice)

        quantum = choices.attention_quantum(shape.head_dim, shape.num_kv_heads, shape.num_heads // shape.num_kv_heads,
                                            device)
        self.embed = weights["embed"].to(dense).to(device)  # rows are gathered, then read as float32
        self.blocks = nn.ModuleList(
            Block(shape, {k: v.to(dense).to(device) for k, v in layer.items()}, make_linear, quantum)
            for layer in weights["layers"])
        self.norm = RMSNorm(weights["norm"].to(dense).to(device), shape.rms_norm_eps)
        # logits keep float32 precision: rounded to bfloat16, near-ties become exact ties (decided by vocabulary
        # order) and sampling probabilities coarsen
        self.lm_head = make_linear(weights["lm_head"], None, float_output=True, kind=dense)
        self.kernels = {f"{o}x{i}": f"{c.kernel} (rows padded to {c.quantum}n)" for (o, i, _), c in chosen.items()}
        self.kernels["attention"] = f"query rows padded to {quantum}n per GEMM"
        self.inv_freq = torch.tensor(shape.rope_inv_freq, dtype=torch.float32, device=device)
        self._rope_cos = torch.empty(0, device=device)
        self._rope_sin = torch.empty(0, device=device)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, head_dim] of `positions` ([n] long), from a table computed once per length."""
        needed = int(positions.max()) + 1
        if self._rope_cos.shape[0] < needed:
            size = max(2 * needed, 1024)
            t = torch.arange(size, dtype=torch.float32, device=self.device)
            emb = torch.outer(t, self.inv_freq).repeat(1, 2)
            self._rope_cos, self._rope_sin = emb.cos(), emb.sin()
            if self.shape.rope_attention_factor != 1.0:
                self._rope_cos, self._rope_sin = self._rope_cos * self.shape.rope_attention_factor, \
                    self._rope_sin * self.shape.rope_attention_factor
        return self._rope_cos[positions], self._rope_sin[positions]

    def new_cache(self) -> KVCache:
        return KVCache(self.shape, self.device)

    @torch.inference_mode()
    def step(self, segments: list[Segment]) -> list[torch.Tensor | None]:
        """One forward over the rows of several requests (each at most MAX_ROWS rows, its own cache): float32
        logits [segment.num_logits, vocab] per segment (None where it wants none). Each row's result is what
        it would be alone: the numerics are row-invariant and attention reads only the row's own cache."""
        layouts = []
        for segment in segments:
            # the tail window of the last row reaches TAIL_KEYS - MAX_ROWS slots past it (services.engine.attention)
            segment.cache.reserve(max(TAIL_KEYS, segment.cache.length + len(segment.token_ids) + TAIL_KEYS - MAX_ROWS))
            layouts.append(RowLayout.build(segment.cache.length, segment.parents, len(segment.token_ids), self.device))
        positions = layouts[0].positions if len(layouts) == 1 else torch.cat([lay.positions for lay in layouts])
        cos, sin = self._rope(positions)
        tokens = torch.tensor([t for segment in segments for t in segment.token_ids], device=self.device)
        x = self.embed[tokens].float()
        where = Rows.of(layouts)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, [segment.cache.buffer[layer] for segment in segments], where)
        wanted, first = [], 0
        for segment in segments:
            rows = len(segment.token_ids)
            segment.cache.length += rows
            wanted.append(torch.arange(first + rows - segment.num_logits, first + rows))
            first += rows
        picked = torch.cat(wanted)
        if not len(picked):
            return [None] * len(segments)
        logits = self.lm_head(self.norm(x[picked.to(self.device)]))
        outs, first = [], 0
        for segment in segments:
            part = logits[first : first + segment.num_logits] if segment.num_logits else None
            # a view would carry the whole batch's logits wherever it goes (pickled to a router, say)
            outs.append(part.clone() if part is not None and len(segments) > 1 else part)
            first += segment.num_logits
        return outs

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype, device: torch.device, consume: bool = False) -> Decoder:
        """Build from a transformers Llama/Mistral/Qwen2/Qwen3 model, fusing its projections (and their biases,
        where the model has them). Layers are built one at a time; with `consume`, each layer's transformers
        weights are released once its block holds its own, so loading needs about one model's memory, not two
        (the caller gives the model up)."""
        shape = DecoderShape.from_hf_config(hf_model.config)
        sd = hf_model.state_dict()

        def fused(names: list[str], suffix: str) -> torch.Tensor | None:
            parts = [sd.get(f"{name}.{suffix}") for name in names]
            return None if parts[0] is None else torch.cat(parts)

        def layers():
            for i in range(shape.num_layers):
                p = f"model.layers.{i}."
                qkv = [f"{p}self_attn.{name}_proj" for name in "qkv"]
                gate_up = [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"]
                layer = {
                    "wqkv": fused(qkv, "weight"),
                    "wqkv_bias": fused(qkv, "bias"),
                    "wo": sd[f"{p}self_attn.o_proj.weight"],
                    "wo_bias": sd.get(f"{p}self_attn.o_proj.bias"),
                    "attn_norm": sd[f"{p}input_layernorm.weight"],
                    "mlp_norm": sd[f"{p}post_attention_layernorm.weight"],
                    "w_gate_up": fused(gate_up, "weight"),
                    "w_gate_up_bias": fused(gate_up, "bias"),
                    "w_down": sd[f"{p}mlp.down_proj.weight"],
                    "w_down_bias": sd.get(f"{p}mlp.down_proj.bias"),
                }
                if shape.qk_norm:
                    layer["q_norm"] = sd[f"{p}self_attn.q_norm.weight"]
                    layer["k_norm"] = sd[f"{p}self_attn.k_norm.weight"]
                yield {key: value for key, value in layer.items() if value is not None}
                del layer
                if consume:
                    for key in [key for key in sd if key.startswith(p)]:
                        del sd[key]
                    for param in hf_model.model.layers[i].parameters():
                        param.data = param.data.new_empty(0)

        weights = {
            "embed": sd["model.embed_tokens.weight"],
            "norm": sd["model.norm.weight"],
            "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
            "layers": layers(),
        }
        return cls(shape, weights, dtype, device).eval()
