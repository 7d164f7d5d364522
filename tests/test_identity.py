"""Identity on the packaged models, in the configs' default dtype (bfloat16): every hierarchy emits exactly
plain decoding's tokens, greedy, and with a seed, coupled sampling emits the same text under every method.

The numerics are row-invariant (`services.engine.model`): a position's logits do not depend on how many
rows a forward computes, so this holds to the last bit, not up to near-ties. Drafts are real and
imperfect: a float32 copy of the target (other kernels, other rounding), a truncated (layer-skipping)
copy, the database drafter with all three databases filled, and for the Qwen pair the 0.5B model
drafting for the 1.5B one. Prompts cover the four workload categories (code, chat, translation,
summarization; `deploy/calibration.jsonl`, not benchmark questions) and short chats that end in EOS;
the tests check that EOS fell inside a draft and that the token limit cut a draft short.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from sim_levels import RandomChooser
from tiny_models import forget_prefixes
from torch import nn

from drafter_db import table
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.model_db import ModelDB
from drafter_db.stores import EmbeddedStore, full_key, tokenizer_namespace
from services.engine.batching import BatchingLevel
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.prompts import Conversation, chat_prompt_ids, stop_token_ids
from services.engine.runner import LevelRunner
from services.engine.sampling import SamplingParams
from services.engine.switching import SwitchingDecoder

pytestmark = pytest.mark.slow

GREEDY = SamplingParams()
CALIBRATION = Path(__file__).resolve().parents[1] / "deploy" / "calibration.jsonl"


def category_prompts() -> list[str]:
    """The first prompt of each category group of the calibration workload."""
    firsts: dict[str, str] = {}
    for line in CALIBRATION.read_text().splitlines():
        question = json.loads(line)
        firsts.setdefault(question["category"].split("/")[0], question["turns"][0])
    return list(firsts.values())


PROMPTS = [*category_prompts(), "Say hi in three words.", "List three colours of the rainbow, comma separated."]


def truncated(runner: LevelRunner, layers: int, name: str) -> LevelRunner:
    """A layer-skipping draft: the first `layers` blocks of the same weights, then the LM head."""
    decoder = copy.copy(runner.decoder)
    decoder._modules = dict(runner.decoder._modules)
    decoder.blocks = nn.ModuleList(list(runner.decoder.blocks)[:layers])
    decoder.shape = runner.decoder.shape.__class__(**{**runner.decoder.shape.__dict__, "num_layers": layers})
    return LevelRunner(decoder, runner.tokenizer, name)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


def assert_identical(target: LevelRunner, hierarchies: dict[str, HierarchicalDecoder], max_tokens: list[int]):
    stops = stop_token_ids(target.tokenizer)
    plain = HierarchicalDecoder([target], [])
    saw_stop = saw_length = False
    accepted = dict.fromkeys(hierarchies, 0)
    stop_in_draft = budget_cut = 0
    sources: set[str] = set()
    for prompt, limit in zip(PROMPTS, max_tokens):
        ids = prompt_ids(target.tokenizer, prompt)
        forget_prefixes(plain, *hierarchies.values())  # each run computes its prompt: none copies another's
        reference = plain.generate(ids, GREEDY, limit, stops)
        saw_stop |= reference.finish_reason == "stop"
        saw_length |= reference.finish_reason == "length"
        for name, decoder in hierarchies.items():
            forget_prefixes(plain, *hierarchies.values())
            out = decoder.generate(ids, GREEDY, limit, stops)
            assert out.token_ids == reference.token_ids, f"{name} diverged on {prompt!r}"
            assert out.finish_reason == reference.finish_reason
            accepted[name] += sum(level.accepted for level in out.stats.levels)
            accepted[name] += sum(source.accepted for source in out.stats.sources.values())
            stop_in_draft += sum(level.stop_token_drafts for level in out.stats.levels)
            budget_cut += sum(level.budget_limited for level in out.stats.levels)
            sources |= {name for name, source in out.stats.sources.items() if source.drafted}
    assert saw_stop and saw_length, "the prompts must cover both EOS and the max-token limit"
    assert all(accepted.values()), f"a hierarchy accepted no draft, the test would prove little: {accepted}"
    return sources, stop_in_draft, budget_cut


def assert_coupled_identical(target: LevelRunner, methods: dict[str, HierarchicalDecoder], seeds=(0, 1, 2),
                             max_tokens: int = 24):
    """With a seed, every method's text is the target's own sample for that seed: the same tokens."""
    stops = stop_token_ids(target.tokenizer)
    plain = HierarchicalDecoder([target], [])
    rejected = 0
    for prompt in PROMPTS[:4]:
        ids = prompt_ids(target.tokenizer, prompt)
        for seed in seeds:
            params = SamplingParams(temperature=0.8, seed=seed)
            forget_prefixes(plain, *methods.values())
            reference = plain.generate(ids, params, max_tokens, stops).token_ids
            for name, decoder in methods.items():
                forget_prefixes(plain, *methods.values())
                out = decoder.generate(ids, params, max_tokens, stops)
                assert out.token_ids == reference, f"{name}, seed {seed}, diverged on {prompt!r}"
                rejected += sum(level.drafted - level.accepted for level in out.stats.levels)
    assert rejected > 0, "no draft was ever rejected: the test would prove little"


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return LevelRunner.load("smollm2-135m", "bfloat16")


@pytest.fixture(scope="module")
def smollm2_f32(smollm2):
    return LevelRunner(LevelRunner.load("smollm2-135m", "float32").decoder, smollm2.tokenizer, "smollm2-f32")


def test_smollm2_hierarchies_equal_plain_decoding(smollm2, smollm2_f32):
    skip = truncated(smollm2_f32, 20, "smollm2-f32-20-layers")
    hierarchies = {
        "2-level T=4": HierarchicalDecoder([smollm2_f32, smollm2], [4]),
        "2-level T=7 confidence-stopped": HierarchicalDecoder([smollm2_f32, smollm2], [DraftPolicy(7, 0.5)]),
        "3-level T=(3,5)": HierarchicalDecoder([skip, smollm2_f32, smollm2], [3, 5]),
    }
    _, stop_in_draft, budget_cut = assert_identical(smollm2, hierarchies, max_tokens=[40, 40, 40, 40, 45, 13])
    assert stop_in_draft > 0 and budget_cut > 0, (stop_in_draft, budget_cut)


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
        answer = plain.generate(prompt_ids(tokenizer, prompt), GREEDY, 24, stop_token_ids(tokenizer))
        model_db.add_output(answer.token_ids)
    config = DrafterConfig(max_key=3, min_share=0.0, min_count=1)
    return HierarchicalDrafter(config, model_db, StatisticsDB(store, namespace))


def test_smollm2_tree_drafts_equal_plain_decoding(smollm2, smollm2_f32):
    drafter = filled_drafter(smollm2)
    target, draft = BatchingLevel(smollm2), BatchingLevel(smollm2_f32)
    members = [HierarchicalDecoder([target], [], proposer=drafter),
               HierarchicalDecoder([draft, target], [DraftPolicy(6, 0.4)], proposer=drafter),
               HierarchicalDecoder([draft, target], [DraftPolicy(5, 0.4)])]
    hierarchies = {
        "hd": members[0],
        "hd+hsd": members[1],
        "switching every round": SwitchingDecoder(members, ["hd", "hd+hsd", "hsd"], RandomChooser(len(members))),
    }
    sources, _, _ = assert_identical(smollm2, hierarchies, max_tokens=[40, 40, 40, 40, 45, 13])
    assert sources == {"context", "model", "statistics"}
    assert_coupled_identical(smollm2, {"hd": members[0], "hd+hsd": members[1], "hsd": members[2]})


def test_smollm2_a_conversations_next_turn_starts_from_its_cache_and_equals_plain_decoding(smollm2):
    """The next turn comes as a new request holding the first turn and its answer: the target copies that prefix
    from the first turn's released cache (keys computed in token-tree verifications), and answers exactly as plain
    decoding does from a cache computed afresh."""
    stops = stop_token_ids(smollm2.tokenizer)
    runner = LevelRunner(smollm2.decoder, smollm2.tokenizer, "smollm2-prefixes")
    fresh = LevelRunner(smollm2.decoder, smollm2.tokenizer, "smollm2-no-prefixes")
    hd = HierarchicalDecoder([runner], [], proposer=filled_drafter(smollm2))
    chat = Conversation(smollm2.tokenizer)
    first_prompt = chat.ask(PROMPTS[0])
    first = hd.generate(first_prompt, GREEDY, 40, stops)
    assert sum(source.accepted for source in first.stats.sources.values()), "no tree path was kept"
    chat.answer(first.token_ids)
    second_prompt = chat.ask("Now the same in one short sentence.")
    reused = runner.prefix_tokens_reused
    second = hd.generate(second_prompt, GREEDY, 40, stops)
    assert runner.prefix_tokens_reused - reused > len(first_prompt)
    assert second.token_ids == HierarchicalDecoder([fresh], []).generate(second_prompt, GREEDY, 40, stops).token_ids
    assert fresh.prefix_tokens_reused == 0


def test_qwen_pair_hierarchies_equal_plain_decoding():
    torch.set_num_threads(2)
    target = LevelRunner.load("qwen2.5-coder-1.5b", "bfloat16")
    draft = LevelRunner.load("qwen2.5-coder-0.5b", "bfloat16")
    skip = truncated(draft, 16, "qwen-0.5b-16-layers")
    hierarchies = {
        "0.5B -> 1.5B, T=5": HierarchicalDecoder([draft, target], [5]),
        "0.5B 16 layers -> 0.5B -> 1.5B, T=(3,6)": HierarchicalDecoder([skip, draft, target], [3, 6]),
    }
    assert_identical(target, hierarchies, max_tokens=[24, 24, 24, 24, 30, 11])
    assert_coupled_identical(target, {"0.5B -> 1.5B, T=5": hierarchies["0.5B -> 1.5B, T=5"]}, seeds=(0, 1),
                             max_tokens=16)
