"""Any causal LM as a level, through transformers' own modeling: slower than the fast decoder, and lossless
only up to floating-point near-ties (below).

The fast decoder (`services.engine.model`) computes the Llama family itself; a
model of another architecture (Phi-3, Gemma, GPT-NeoX, ...) runs here. Each
request keeps a transformers `DynamicCache`; a forward appends its rows with
explicit positions and a 4D attention mask, so a token tree is verified in one
forward as with the fast decoder (a row sees the committed tokens, its
ancestors and itself). Rolling back is cropping the cache; keeping a tree's
verified path is gathering its nodes' keys and values.

What is not the same as the fast decoder: transformers' kernels are not
row-invariant, so a position's logits can differ in the last bits between a
one-token step and a verification of several rows, and where the argmax is a
near-tie a speculative method picks another token than plain decoding: its text
can then differ from `ar`'s. In bfloat16 that is common: SmolLM2 forced through
this path, `hd` against `ar`, greedy, 64 tokens, gave other text on 3 of 8
calibration prompts. In float32 it gave the same text on 8 of 8 (rare, not
ruled out), so the fallback always computes in float32 from the checkpoint's own
values, whatever dtype the config asks for; the fast decoder is exact in both.
RoPE whose frequencies transformers switches with the sequence length
(`dynamic`, `longrope`) is served only up to the length where it switches, and
sliding-window attention only up to the window, where both are exact. Requests
of one forward run one after another: transformers' caches are per batch, not
per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.engine.kernels import MAX_ROWS
from services.engine.model import (
    STATIC_ROPE,
    CausalDecoder,
    Decoder,
    DecoderShape,
    Segment,
    UnsupportedModel,
    sliding_window,
)

log = logging.getLogger("hierspec")


@dataclass(frozen=True)
class FallbackShape:
    vocab_size: int
    max_positions: int
    kv_bytes_per_token: int  # float32 keys and values of every layer (0: unknown)


class TransformersCache:
    """A request's keys and values in a transformers `DynamicCache`, with the fast decoder's cache contract:
    `length` tokens are committed; rows past it (a rejected draft, a tree's nodes) are dropped before the next
    forward, unless `keep` moved them into the committed prefix first."""

    def __init__(self):
        from transformers import DynamicCache

        # no config: with one, transformers makes sliding-window layers of a model that has a window, which
        # cannot be cropped; the explicit 4D mask and the context capped to the window make plain layers exact
        self.cache = DynamicCache()
        self.length = 0

    def _stored(self) -> int:
        return self.cache.get_seq_length()

    def trim(self) -> None:
        """Drop the rows past `length` (transformers appends after whatever the cache holds)."""
        extra = self._stored() - self.length
        if extra > 0:
            self.cache.crop(-extra)

    def keep(self, start: int, slots: list[int]) -> None:
        index = torch.tensor(list(range(start)) + slots)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
                layer.values = layer.values.index_select(-2, index.to(layer.values.device))
        self.length = start + len(slots)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


class TransformersDecoder(CausalDecoder):
    """A transformers causal LM behind the level interface (`step`, `new_cache`, `shape`)."""

    def __init__(self, hf_model, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.model = hf_model.to(dtype=dtype, device=device).eval()
        self.dtype = dtype
        self.device = device
        config = hf_model.config
        self.shape = FallbackShape(hf_model.get_output_embeddings().weight.shape[0], _exact_positions(config),
                                   _kv_bytes_per_token(config))
        self.kernels = {"all": f"transformers' own {config.model_type} modeling "
                               f"({config._attn_implementation} attention, 4D masks for token trees)"}
        self._check_cache()

    def new_cache(self) -> TransformersCache:
        return TransformersCache()

    def _check_cache(self) -> None:
        cache = self.new_cache()
        self.step([Segment([0, 0], cache, 1)])
        kinds = {type(layer).__name__ for layer in cache.cache.layers}
        if not all(getattr(layer, "is_croppable", False) and not getattr(layer, "is_sliding", True)
                   for layer in cache.cache.layers):
            raise ValueError(f"{self.model.config.model_type}: its cache ({', '.join(sorted(kinds))}) cannot be "
                             "rolled back to a verified prefix, so no level can run it")

    @torch.inference_mode()
    def step(self, segments: list[Segment]) -> list[torch.Tensor | None]:
        return [self._forward(segment) for segment in segments]

    def _forward(self, segment: Segment) -> torch.Tensor | None:
        cache, n = segment.cache, len(segment.token_ids)
        if n > MAX_ROWS:
            raise ValueError(f"a forward computes at most {MAX_ROWS} rows, got {n}")
        cache.trim()
        parents = segment.parents if segment.parents is not None else list(range(-1, n - 1))
        sees = torch.zeros(n, cache.length + n, dtype=torch.bool)
        sees[:, : cache.length] = True
        depth = []
        for r, parent in enumerate(parents):
            if not -1 <= parent < r:
                raise ValueError("parents must come before their children")
            if parent >= 0:
                sees[r] = sees[parent]
            sees[r, cache.length + r] = True
            depth.append(0 if parent < 0 else depth[parent] + 1)
        mask = torch.where(sees, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        out = self.model(torch.tensor([segment.token_ids], device=self.device),
                         position_ids=torch.tensor([[cache.length + d for d in depth]], device=self.device),
                         attention_mask=mask[None, None].to(self.device), cache=cache.cache,
                         use_cache=True, logits_to_keep=segment.num_logits or 1)
        cache.length += n
        return out.logits[0, -segment.num_logits:].float() if segment.num_logits else None


def _kv_bytes_per_token(config) -> int:
    """Float32 keys and values of every layer for one position, from the configs' usual names; 0 where a config
    lacks them (the cache bound's log line then gives no figure)."""
    layers, heads = getattr(config, "num_hidden_layers", 0), getattr(config, "num_attention_heads", 0)
    if not layers or not heads:
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return layers * 2 * kv_heads * (getattr(config, "head_dim", None) or config.hidden_size // heads) * 4


def _exact_positions(config) -> int:
    """The longest sequence this path computes exactly: the model's context, capped where a sliding window
    would start masking and where a length-dependent RoPE would switch its frequencies."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    window = sliding_window(config)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        positions = min(positions, rope.get("original_max_position_embeddings") or positions)
    return min(positions, window) if window else positions


def fast_decoder_computes(config) -> bool:
    try:
        DecoderShape.from_hf_config(config)
        return True
    except UnsupportedModel:
        return False


def load_decoder(hf_model, dtype: torch.dtype, device: torch.device) -> CausalDecoder:
    """The fast decoder where it has the architecture, else transformers' modeling (in float32); says which,
    and why. The decoder takes the model's weights over: the caller gives `hf_model` up."""
    try:
        decoder = Decoder.from_hf(hf_model, dtype, device, consume=True)
        log.info("%s: the fast decoder", hf_model.config.model_type)
        return decoder
    except UnsupportedModel as reason:
        decoder = TransformersDecoder(hf_model, torch.float32, device)
        log.warning("%s; it runs through transformers' own modeling instead, in float32, with %d positions "
                    "(slower, and lossless only up to floating-point near-ties: see services/engine/fallback.py)",
                    reason, decoder.shape.max_positions)
        return decoder
