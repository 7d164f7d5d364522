"""The databases and the hierarchical drafter, without a model."""

from __future__ import annotations

import pickle

import pytest

from drafter_db import table
from drafter_db.context import ContextIndex
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.keys import ngram_key, suffix_keys
from drafter_db.model_db import ModelDB
from drafter_db.replay import replay
from drafter_db.stores import EmbeddedStore, full_key


def test_suffix_keys_are_the_ngram_keys_of_the_last_tokens_longest_first():
    tokens = [5, 2_000_000, 3, 77]
    assert suffix_keys(tokens, 3) == [ngram_key(tokens[-3:]), ngram_key(tokens[-2:]), ngram_key(tokens[-1:])]
    assert len(set(suffix_keys([0, 0, 0], 3))) == 3  # lengths never collide, even on token 0


def test_context_index_finds_recent_continuations_in_order():
    index = ContextIndex(max_key=3)
    index.extend([5, 6, 7, 8, 5, 6, 9, 5, 6])
    assert index.continuations(ngram_key([5, 6]), 2, 4) == [[9, 5], [7, 8]]  # most recent occurrence first
    assert index.continuations(ngram_key([1, 2]), 2, 4) == []
    index.extend([4])
    assert index.continuations(ngram_key([6]), 3, 1) == [[4]]  # the last occurrence: its continuation is short


def test_model_db_ranks_by_count_and_evicts_rare_keys(tmp_path):
    db = ModelDB(max_key=2, length=2, top=2, max_keys=1000)
    for _ in range(3):
        db.add_output([1, 2, 3])
    db.add_output([1, 2, 4])
    assert db.lookup(ngram_key([1, 2])) == (4, [(3, (3,)), (1, (4,))])
    for start in range(0, 3000, 3):
        db.add_output([start + 10, start + 11])
    assert len(db) <= 1000
    assert db.lookup(ngram_key([1, 2]))[0]  # frequent keys survive eviction
    db.save(tmp_path / "model.db")
    again = ModelDB(max_key=2, length=2, top=2, max_keys=1000)
    again.load(tmp_path / "model.db")
    assert again.lookup(ngram_key([1, 2])) == db.lookup(ngram_key([1, 2]))
    (tmp_path / "old.db").write_bytes(pickle.dumps({"entries": {}, "totals": {}}))  # before format versions
    with pytest.raises(ValueError, match="not a model DB of this hierspec version"):
        again.load(tmp_path / "old.db")


def make_drafter(**overrides) -> HierarchicalDrafter:
    store = EmbeddedStore()
    store.set_many({full_key("ns", (7,)): table.encode([(9, (8, 9)), (1, (3,))])})
    model_db = ModelDB(max_key=2, length=3)
    model_db.add_output([20, 21, 22, 23])
    model_db.add_output([20, 21, 22, 23])
    config = DrafterConfig(**{"max_key": 2, "min_share": 0.3, "min_count": 2, **overrides})
    return HierarchicalDrafter(config, model_db, StatisticsDB(store, "ns"))


def test_drafter_visits_databases_by_locality_and_labels_sources():
    drafter = make_drafter()
    drafter.start("r", [1, 2, 3, 1, 2])
    tree = drafter.propose("r", [1, 2, 3, 1, 2], 4)
    assert tree.sources and set(tree.sources) == {"context"}  # context matched: no need to go further
    drafter.start("m", [5, 20, 21])
    assert set(drafter.propose("m", [5, 20, 21], 4).sources) == {"model"}
    drafter.start("s", [5, 6, 7])
    tree = drafter.propose("s", [5, 6, 7], 4)
    assert tree.tokens == [8, 9] and set(tree.sources) == {"statistics"}  # (1, (3,)) lacks share and count


def test_drafter_proposes_nothing_when_nothing_matches():
    drafter = make_drafter()
    drafter.start("r", [40, 41, 42])
    assert len(drafter.propose("r", [40, 41, 42], 4)) == 0


def test_replay_counts_exact_greedy_steps():
    output = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    result = replay(make_drafter(max_depth=4), [([1, 2, 3, 4], output)], cost=lambda rows: 1.0)
    assert result.tokens == len(output)
    assert result.steps < len(output)  # the repeated pattern is drafted from the context
    assert result.accepted_by_source["context"] == len(output) - result.steps
