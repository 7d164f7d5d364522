"""Tiny random models built in code: real decoder logic at microsecond cost.

`arch` names a transformers architecture, or a Llama variant: `llama3`, `yarn` and `linear` (RoPE scalings, tuned to
a 64-token original context so every frequency band of an 8-wide head is touched), `llama-tied` (tied
embeddings, attention and MLP biases). `phi3` and `gemma` are not in the fast decoder: they run through
transformers' modeling (`services.engine.fallback`)."""

from __future__ import annotations

import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from services.engine.fallback import load_decoder
from services.engine.runner import LevelRunner


def tiny_hf_model(seed: int, arch: str = "llama", vocab: int = 6, layers: int = 2, hidden: int = 32,
                  init_range: float = 0.4):
    """A random model whose logits are peaked enough that different seeds disagree clearly."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=init_range, tie_word_embeddings=False)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch in ("llama3", "yarn", "linear"):
        scaling = {"llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                   "yarn": {"rope_type": "yarn", "factor": 4.0},
                   "linear": {"rope_type": "linear", "factor": 2.0}}[arch]
        rope = {"rope_theta": 10000.0, "original_max_position_embeddings": 64, **scaling}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    elif arch == "llama-tied":
        model = LlamaForCausalLM(LlamaConfig(**{**common, "tie_word_embeddings": True}, attention_bias=True,
                                             mlp_bias=True))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=24))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    elif arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                                           sliding_window=32))  # as real Phi-3 checkpoints have one
    elif arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**common, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # random biases (and, but in the two oldest, norm weights): those paths are exercised
        for name, param in model.named_parameters():
            if name.endswith("bias") or (name.endswith("norm.weight") and arch not in ("llama", "qwen2")):
                param.normal_(0 if name.endswith("bias") else 1, init_range)
    return model.eval()


def forget_prefixes(*decoders) -> None:
    """Runs a test compares each compute their prompts: their levels drop the caches the runs before released
    (prefix caching would otherwise copy the prompt, and the prefill under test would not run)."""
    for decoder in decoders:
        for member in getattr(decoder, "members", [decoder]):
            for level in member.levels:
                getattr(level, "runner", level).forget_released()


def tiny_runner(seed: int, arch: str = "llama", dtype=torch.float32, **kwargs) -> LevelRunner:
    return LevelRunner(load_decoder(tiny_hf_model(seed, arch, **kwargs), dtype, torch.device("cpu")),
                       tokenizer=None, name=f"tiny-{arch}-{seed}")
