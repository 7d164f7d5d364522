"""The databases and the hierarchical drafter, without a model."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest

from drafter_db import table
from drafter_db.context import ContextIndex
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.files import TableFileError
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
    with pytest.raises(TableFileError, match="not a hierspec table file"):
        again.load(tmp_path / "old.db")


class _Planted:
    """Unpickling this runs code: it creates the file named in its state."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("damage", ["truncated", "altered", "pickle", "other kind"])
def test_table_files_hold_data_only_and_a_damaged_one_is_one_line(tmp_path, damage):
    """A statistics or model DB file from anyone is at worst refused: a pickle is not loaded (its code does
    not run), and truncation or a flipped byte fails the checksum."""
    from drafter_db.files import read_table, write_table

    path, ran = tmp_path / "table", tmp_path / "code-ran"
    write_table(path, "statistics", 1, [(b"k%d" % i, b"value %d" % i) for i in range(100)])
    assert read_table(path, "statistics", 1)[7] == (b"k7", b"value 7")
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "altered": data[:40] + bytes([data[40] ^ 1]) + data[41:],
               "pickle": pickle.dumps({"entries": _Planted(ran)}), "other kind": None}[damage]
    if damaged is None:
        write_table(path, "model-db", 1, [])
    else:
        path.write_bytes(damaged)
    with pytest.raises(TableFileError) as error:
        read_table(path, "statistics", 1)
    assert "\n" not in str(error.value) and str(path) in str(error.value) and not ran.exists()


def test_a_damaged_statistics_or_model_db_file_is_left_out_with_a_warning(tmp_path, caplog):
    from deploy.builder import build_drafter
    from deploy.config import DrafterSettings
    from services.engine.model_store import load_tokenizer

    (tmp_path / "stats").write_bytes(b"\x80\x04garbage")
    (tmp_path / "model.db").write_bytes(b"HSTABLE\0" + b"\0" * 10)
    settings = DrafterSettings(statistics_path=str(tmp_path / "stats"), model_db_path=str(tmp_path / "model.db"))
    drafter = build_drafter(settings, load_tokenizer("smollm2-135m"))
    assert len(drafter.model_db) == 0 and drafter.statistics.store.data == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("statistics DB left out" in w and "stats" in w for w in warnings)
    assert any("model DB starts empty" in w for w in warnings)


def test_the_model_db_survives_a_restart(tmp_path):
    """Saved periodically while outputs come in, and when the server shuts down; the next start reads it."""
    from deploy.builder import build_drafter
    from deploy.config import DrafterSettings
    from drafter_db.model_db import ModelDBSaver
    from services.engine.model_store import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    path = tmp_path / "model.db"
    settings = DrafterSettings(model_db_path=str(path))
    first = build_drafter(settings, tokenizer)
    saver = ModelDBSaver(first.model_db, path, period_s=0.05)
    first.model_db.add_output([5, 6, 7, 8])
    deadline = time.time() + 10
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists()  # the periodic save
    first.model_db.add_output([15, 16, 17, 18])
    saver.close()  # shutdown
    again = build_drafter(settings, tokenizer).model_db
    assert again.lookup(ngram_key([6]))[1] == [(1, (7, 8))] and again.lookup(ngram_key([16]))[1] == [(1, (17, 18))]


def test_malformed_or_out_of_vocabulary_store_values_are_not_drafted():
    """The statistics store is shared and outlives the process: a value that does not decode, or names a
    token id the vocabulary lacks, drafts nothing (and is counted) instead of raising or reaching a model."""
    store = EmbeddedStore()
    store.set_many({full_key("ns", (1,)): b"\x05\x00",  # truncated
                    full_key("ns", (2,)): table.encode([(9, (3, 40_000))]),  # out of a 32-token vocabulary
                    full_key("ns", (3,)): table.encode([(9, (4, 5))])})
    stats = StatisticsDB(store, "ns", vocab_size=32)
    drafter = HierarchicalDrafter(DrafterConfig(max_key=1, min_share=0.0, min_count=1), None, stats)
    assert [drafter.propose("r", [t], 4).tokens for t in (1, 2, 3)] == [[], [], [4, 5]]
    assert stats.malformed == 2


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
