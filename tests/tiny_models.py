"""Tiny random Llama/Qwen2 models built in code: real decoder logic at microsecond cost."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from services.engine.model import Decoder
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
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # random q/k/v biases, so the bias path is exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, init_range)
    return model.eval()


def tiny_runner(seed: int, arch: str = "llama", dtype=torch.float32, **kwargs) -> LevelRunner:
    return LevelRunner(Decoder.from_hf(tiny_hf_model(seed, arch, **kwargs), dtype, torch.device("cpu")),
                       tokenizer=None, name=f"tiny-{arch}-{seed}")
