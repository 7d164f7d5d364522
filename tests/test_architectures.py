"""Each architecture against transformers' own modeling of a tiny random model of it: the same logits (float32)
for a prefill, for cached one-token steps, after a rollback and for a token tree, and the same greedy text. The
fast decoder's architectures, and two it lacks (Phi-3, Gemma), which run through the fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_hf_model
from transformers import GPTNeoXConfig

from services.engine.fallback import TransformersDecoder, _exact_positions, load_decoder
from services.engine.model import Decoder, DecoderShape, UnsupportedModel
from services.engine.tree import TokenTree

FAST = ["llama", "llama3", "yarn", "linear", "llama-tied", "mistral", "qwen2", "qwen3"]
FALLBACK = ["phi3", "gemma"]
ARCHS = FAST + FALLBACK
TOKENS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4])
TOL = dict(atol=1e-4, rtol=1e-4)


def _pair(arch: str):
    hf = tiny_hf_model(11, arch, vocab=16, init_range=0.1)
    given = copy.deepcopy(hf)
    decoder = load_decoder(given, torch.float32, torch.device("cpu"))
    assert isinstance(decoder, TransformersDecoder if arch in FALLBACK else Decoder)
    if arch in FAST:  # it took the weights over: transformers' copies of the layers are gone
        assert all(param.numel() == 0 for layer in given.model.layers for param in layer.parameters())
    return hf, decoder


def _reference(hf, tokens) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.as_tensor(tokens)[None]).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_cached_steps_match_transformers(arch):
    hf, decoder = _pair(arch)
    reference = _reference(hf, TOKENS)
    torch.testing.assert_close(decoder(TOKENS, decoder.new_cache(), len(TOKENS)), reference, **TOL)
    cache = decoder.new_cache()
    decoder(TOKENS[:8], cache, 1)
    steps = torch.cat([decoder(TOKENS[i : i + 1], cache, 1) for i in range(8, len(TOKENS))])
    torch.testing.assert_close(steps, reference[8:], **TOL)
    decoder(torch.tensor([0, 0, 0]), cache, 3)  # a rejected draft
    cache.length = 12
    torch.testing.assert_close(decoder(TOKENS[12:], cache, len(TOKENS) - 12), reference[12:], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_token_tree_matches_transformers_on_every_path(arch):
    hf, decoder = _pair(arch)
    tree = TokenTree()
    for path in ([4, 2, 7], [4, 3], [11, 12, 13, 1], [5]):
        tree.add_path(path, "test", budget=16)
    cache = decoder.new_cache()
    decoder(TOKENS[:-1], cache, 1)
    parents = [-1] + [node + 1 for node in tree.parents]  # row 0: the last committed token
    logits = decoder(torch.tensor([int(TOKENS[-1])] + tree.tokens), cache, len(tree) + 1, parents)
    torch.testing.assert_close(logits[0], _reference(hf, TOKENS)[-1], **TOL)
    for node in range(len(tree)):
        path = TOKENS.tolist() + [tree.tokens[i] for i in tree.path_to(node)]
        torch.testing.assert_close(logits[1 + node], _reference(hf, path)[-1], **TOL)
    verified = tree.path_to(6)  # 11, 12, 13: nodes 4, 5, 6
    assert [tree.tokens[node] for node in verified] == [11, 12, 13]
    cache.keep(len(TOKENS), [len(TOKENS) + node for node in verified])
    torch.testing.assert_close(decoder(torch.tensor([9]), cache, 1)[0],
                               _reference(hf, TOKENS.tolist() + [11, 12, 13, 9])[-1], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_text_matches_transformers(arch):
    hf, decoder = _pair(arch)
    prompt = TOKENS[:6]
    expected = hf.generate(prompt[None], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=16,
                           min_new_tokens=16, do_sample=False)[0, 6:].tolist()
    cache, ours = decoder.new_cache(), []
    logits = decoder(prompt, cache, 1)
    for _ in range(16):
        ours.append(int(logits[-1].argmax()))
        logits = decoder(torch.tensor(ours[-1:]), cache, 1)
    assert ours == expected


@pytest.mark.parametrize("arch,window", [("mistral", 24), ("phi3", 32)])
def test_a_sliding_window_caps_the_context_window(arch, window):
    hf, decoder = _pair(arch)
    assert decoder.shape.max_positions == hf.config.sliding_window == window


def test_a_rope_that_switches_with_length_is_served_up_to_the_switch():
    from transformers import Phi3Config

    config = Phi3Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=0, eos_token_id=None,
                        original_max_position_embeddings=128,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                                         "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
    assert _exact_positions(config) == 128


def test_an_architecture_the_decoder_lacks_is_refused_by_name():
    config = GPTNeoXConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(UnsupportedModel, match="'gpt_neox' is not in the fast decoder"):
        DecoderShape.from_hf_config(config)
