"""Greedy identity on the packaged models: every hierarchy emits exactly plain decoding's tokens.

Runs in float32 (where a multi-token verification and a one-token step agree
to the last bit that can flip an argmax). Drafts are real and imperfect: a
bfloat16 copy of the target, a truncated (layer-skipping) copy, and for the
Qwen pair the 0.5B model drafting for the 1.5B one. Prompts are chosen so that
EOS arrives inside a draft and the max-token limit falls inside a draft.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sim_levels import RandomChooser
from torch import nn

from drafter_db import table
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.model_db import ModelDB
from drafter_db.stores import EmbeddedStore, full_key, tokenizer_namespace
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.levels import LocalLevel
from services.engine.prompts import chat_prompt_ids, stop_token_ids
from services.engine.runner import LevelRunner
from services.engine.sampling import SamplingParams
from services.engine.switching import SwitchingDecoder

pytestmark = pytest.mark.slow

GREEDY = SamplingParams()
PROMPTS = [
    "Say hi in three words.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three colours of the rainbow, comma separated.",
]


def truncated(runner: LevelRunner, layers: int, name: str) -> LevelRunner:
    """A layer-skipping draft: the first `layers` blocks of the same weights, then the LM head."""
    decoder = copy.copy(runner.decoder)
    decoder._modules = dict(runner.decoder._modules)
    decoder.blocks = nn.ModuleList(list(runner.decoder.blocks)[:layers])
    decoder.shape = runner.decoder.shape.__class__(**{**runner.decoder.shape.__dict__, "num_layers": layers})
    return LevelRunner(decoder, runner.tokenizer, name)


def assert_identical(target: LevelRunner, hierarchies: dict[str, HierarchicalDecoder], max_tokens: list[int]):
    stops = stop_token_ids(target.tokenizer)
    plain = HierarchicalDecoder([target], [])
    saw_stop = saw_length = False
    accepted = dict.fromkeys(hierarchies, 0)
    sources: set[str] = set()
    for prompt, limit in zip(PROMPTS, max_tokens):
        ids = chat_prompt_ids(target.tokenizer, [{"role": "user", "content": prompt}])
        reference = plain.generate(ids, GREEDY, limit, stops)
        saw_stop |= reference.finish_reason == "stop"
        saw_length |= reference.finish_reason == "length"
        for name, decoder in hierarchies.items():
            out = decoder.generate(ids, GREEDY, limit, stops)
            assert out.token_ids == reference.token_ids, f"{name} diverged on {prompt!r}"
            assert out.finish_reason == reference.finish_reason
            accepted[name] += sum(level.accepted for level in out.stats.levels)
            accepted[name] += sum(source.accepted for source in out.stats.sources.values())
            sources |= {name for name, source in out.stats.sources.items() if source.drafted}
    assert saw_stop and saw_length, "the prompts must cover both EOS and the max-token limit"
    assert all(accepted.values()), f"a hierarchy accepted no draft, the test would prove little: {accepted}"
    return sources


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return LevelRunner.load("smollm2-135m", "float32")


def test_smollm2_hierarchies_equal_plain_decoding(smollm2):
    bf16 = LevelRunner(LevelRunner.load("smollm2-135m", "bfloat16").decoder, smollm2.tokenizer, "smollm2-bf16")
    skip = truncated(bf16, 20, "smollm2-bf16-20-layers")
    hierarchies = {
        "2-level T=4": HierarchicalDecoder([bf16, smollm2], [4]),
        "2-level T=7 confidence-stopped": HierarchicalDecoder([bf16, smollm2], [DraftPolicy(7, 0.5)]),
        "3-level T=(3,5)": HierarchicalDecoder([skip, bf16, smollm2], [3, 5]),
    }
    assert_identical(smollm2, hierarchies, max_tokens=[40, 45, 13])


def filled_drafter(runner: LevelRunner) -> HierarchicalDrafter:
    """A drafter whose three databases all have data: the model DB and the (embedded) statistics DB
    learn from plain-decoding answers to other prompts, so their drafts are plausible, not perfect."""
    tokenizer = runner.tokenizer
    namespace = tokenizer_namespace(tokenizer)
    store = EmbeddedStore()
    texts = [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
        "The colours of the rainbow are red, orange, yellow, green, blue, indigo and violet.",
    ]
    counted: dict = {}
    for text in texts:
        for key, conts in table.count_ngrams(tokenizer.encode(text), 3, 6).items():
            counted.setdefault(key, {}).update(conts)
    store.set_many({full_key(namespace, k): table.encode(table.merge([], ((c, t) for t, c in v.items()), 4))
                    for k, v in counted.items()})
    model_db = ModelDB(max_key=3)
    plain = HierarchicalDecoder([runner], [])
    for prompt in ("Say hello.", "Name two colours."):
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        model_db.add_output(plain.generate(ids, GREEDY, 24, stop_token_ids(tokenizer)).token_ids)
    config = DrafterConfig(max_key=3, min_share=0.0, min_count=1)
    return HierarchicalDrafter(config, model_db, StatisticsDB(store, namespace))


def test_smollm2_tree_drafts_equal_plain_decoding(smollm2):
    bf16 = LevelRunner(LevelRunner.load("smollm2-135m", "bfloat16").decoder, smollm2.tokenizer, "smollm2-bf16")
    drafter = filled_drafter(smollm2)
    target, draft = LocalLevel(smollm2), LocalLevel(bf16)
    members = [HierarchicalDecoder([target], [], proposer=drafter),
               HierarchicalDecoder([draft, target], [DraftPolicy(6, 0.4)], proposer=drafter),
               HierarchicalDecoder([draft, target], [DraftPolicy(5, 0.4)])]
    hierarchies = {
        "hd": members[0],
        "hd+hsd": members[1],
        "switching every round": SwitchingDecoder(members, ["hd", "hd+hsd", "hsd"], RandomChooser(len(members))),
    }
    sources = assert_identical(smollm2, hierarchies, max_tokens=[40, 45, 13])
    assert sources == {"context", "model", "statistics"}


def test_qwen_pair_hierarchies_equal_plain_decoding():
    torch.set_num_threads(2)
    target = LevelRunner.load("qwen2.5-coder-1.5b", "float32")
    draft = LevelRunner.load("qwen2.5-coder-0.5b", "float32")
    draft_bf16 = LevelRunner.load("qwen2.5-coder-0.5b", "bfloat16")
    hierarchies = {
        "0.5B -> 1.5B, T=5": HierarchicalDecoder([draft, target], [5]),
        "0.5B bf16 -> 0.5B -> 1.5B, T=(3,6)": HierarchicalDecoder([draft_bf16, draft, target], [3, 6]),
    }
    assert_identical(target, hierarchies, max_tokens=[24, 30, 11])
