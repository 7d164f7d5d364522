"""The statistics DB against a real redis-server: build, lookups, namespacing, and an outage."""

from __future__ import annotations

import json
import time

import pytest
import torch
from tiny_models import tiny_runner

from deploy.cli import main
from deploy.reliability.redis_server import RedisServer
from drafter_db import table
from drafter_db.build import BuildSettings, build_statistics
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.keys import ngram_key, suffix_keys
from drafter_db.stores import EmbeddedStore, RedisStore, full_key, generation_key, generation_namespace
from services.engine.hsd import HierarchicalDecoder
from services.engine.sampling import SamplingParams


class CharTokenizer:
    """A character-level tokenizer: enough to exercise the build without a model."""

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) % 64 for ch in text]

    def get_vocab(self):
        return {chr(i): i for i in range(64)}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def corpus(tmp_path):
    (tmp_path / "corpus").mkdir(exist_ok=True)
    (tmp_path / "corpus" / "a.txt").write_text("the cat sat on the mat. the cat sat on the hat. " * 3)
    (tmp_path / "corpus" / "b.jsonl").write_text(json.dumps({"text": "the cat ran"}) + "\n")
    return [str(tmp_path / "corpus")]


def current(store, namespace: str, text: str) -> bytes | None:
    """The value readers get for `text`'s n-gram: from the generation the namespace's pointer names."""
    generation = store.get_many([generation_key(namespace)])[0]
    return store.get_many([full_key(generation_namespace(namespace, generation), CharTokenizer().encode(text))])[0]


def test_build_writes_ranked_continuations_and_a_rerun_replaces_them(tmp_path, redis_server):
    store = RedisStore(redis_server.url)
    settings = BuildSettings(max_key=3, length=4, top=3, min_count=2)
    summary = build_statistics(corpus(tmp_path), CharTokenizer(), store, "chars", settings)
    assert summary["keys_written"] > 0
    first = current(store, "chars", "the")
    _, best = table.decode(first)[0]
    assert list(best) == CharTokenizer().encode(" cat")  # " cat" follows "the" 7 times, " mat"/" hat" 3 times
    again = build_statistics(corpus(tmp_path), CharTokenizer(), store, "chars", settings)
    assert current(store, "chars", "the") == first and again["generation"] != summary["generation"]
    assert again["old_keys_deleted"] == summary["keys_written"]  # the first build's table is gone
    assert len(list(store.client.scan_iter(match=b"hs:chars*"))) == again["keys_written"] + 1  # + the pointer
    assert current(store, "other-tokenizer", "the") is None


def test_a_rebuild_replaces_the_table_whole_and_readers_never_see_a_mix(tmp_path, redis_server):
    """Corpus A, then a rebuild from corpus B: while B is written, a reader sees all of A and nothing of B;
    afterwards, all of B and nothing of A, the keys of an old-layout build (before generations) deleted too."""
    settings = BuildSettings(max_key=3, length=4, top=3, min_count=2)
    store = RedisStore(redis_server.url)
    store.set_many({full_key("chars", CharTokenizer().encode("old")): table.encode([(5, (1, 2))]),
                    full_key("chars@20260101T000000-failed", CharTokenizer().encode("old")): b"partial"})
    store.client.xadd("hs:chars:outputs", {"tokens": b"\x01"})  # the model DB's stream, under the old prefix
    build_statistics(corpus(tmp_path), CharTokenizer(), store, "chars", settings)
    assert current(store, "chars", "old") is None
    assert store.client.xlen("hs:chars:outputs") == 1  # not a table entry: kept
    assert not list(store.client.scan_iter(match=b"hs:chars@20260101T000000-failed:*"))  # a failed build's, gone
    (tmp_path / "nothing.txt").write_text("")
    with pytest.raises(ValueError, match="the table in use is kept"):
        build_statistics([str(tmp_path / "nothing.txt")], CharTokenizer(), store, "chars", settings)
    assert current(store, "chars", "the") is not None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "b.txt").write_text("the dog ran to the log. the dog ran to the fog. " * 3)
    reader = StatisticsDB(RedisStore(redis_server.url), "chars")

    def continuation(text: str) -> list[int] | None:
        context = CharTokenizer().encode(text)
        total, conts = reader.lookup(context, suffix_keys(context, len(context)))[0]  # the longest key
        return list(conts[0][1]) if total else None

    assert continuation("the") == CharTokenizer().encode(" cat") and continuation(" do") is None

    class Watched:
        """The store as the build writes it, with the reader's view checked after every batch."""

        def __getattr__(self, name):
            return getattr(store, name)

        def set_many(self, items):
            store.set_many(items)
            if generation_key("chars") not in items:  # before the switch
                reader.clear_cache()
                assert continuation("the") == CharTokenizer().encode(" cat") and continuation(" do") is None

    summary = build_statistics([str(tmp_path / "b")], CharTokenizer(), Watched(), "chars", settings, batch=5)
    assert summary["old_keys_deleted"] > 0
    assert continuation(" to") == CharTokenizer().encode(" the")  # a cache miss reads the pointer: the new table
    assert continuation(" do") == CharTokenizer().encode("g ra")  # ... and what the reader had cached is dropped
    assert continuation("the") == CharTokenizer().encode(" dog")
    assert continuation(" ca") is None


def test_embedded_store_persists(tmp_path):
    path = tmp_path / "stats.ngrams"
    store = EmbeddedStore(path)
    build_statistics(corpus(tmp_path), CharTokenizer(), store, "chars", BuildSettings(length=4))
    store.save()
    again = EmbeddedStore(path)
    assert current(again, "chars", "the") == current(store, "chars", "the") is not None
    (tmp_path / "b.txt").write_text("the dog ran. " * 4)
    build_statistics([str(tmp_path / "b.txt")], CharTokenizer(), again, "chars", BuildSettings(length=4))
    assert current(again, "chars", " ca") is None and current(again, "chars", " do") is not None  # A's table gone


def test_db_build_never_prints_the_redis_password(tmp_path, capsys, caplog):
    server = RedisServer(tmp_path, ["--requirepass", "s3cret-pw"], login=("default", "s3cret-pw"))
    server.start()
    try:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        assert main(["db", "build", "--corpus", *corpus(tmp_path), "--model", "smollm2-135m", "--redis", url,
                     "--min-count", "1"]) == 0
        out = capsys.readouterr()
        printed = out.out + out.err + caplog.text
        assert json.loads(out.out.splitlines()[-1])["redis"] == f"redis://:***@127.0.0.1:{server.port}/0"
        assert "s3cret-pw" not in printed
    finally:
        server.stop()


def test_db_build_cli_reports_bad_corpus(capsys):
    code = main(["db", "build", "--corpus", "/no/such/corpus", "--model", "smollm2-135m"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_chat_corpus_of_the_models_own_answers_resumes_and_builds(tmp_path, capsys):
    """`db answers` appends one answer per prompt turn, picks up where an earlier run stopped, and its
    file is a corpus `db build` reads."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"question_id": "a", "category": "chat", "turns": ["Name a colour."]},
            {"question_id": "b", "category": "chat", "turns": ["Say hello.", "Now say it in French."]}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows[:1]))
    out = tmp_path / "answers.jsonl"
    common = ["db", "answers", "--config", "deploy/configs/smollm2-cpu.yaml", "--dtype", "float32",
              "--out", str(out), "--max-tokens", "8", "--prompts", str(prompts)]
    assert main(common) == 0
    first = out.read_text().splitlines()
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(common) == 0
    lines = out.read_text().splitlines()
    assert lines[:1] == first and len(lines) == 3 and all(json.loads(line)["text"] for line in lines)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["generated"] == 2
    assert main(common) == 0 and len(out.read_text().splitlines()) == 3  # nothing left to do
    assert main(["db", "build", "--corpus", str(out), "--model", "smollm2-135m", "--out", str(tmp_path / "s.ngrams"),
                 "--min-count", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["path"] == str(tmp_path / "s.ngrams")


VOCAB = 8
PROMPT = [1, 2, 3, 4, 5, 6, 7, 1, 2]


def statistics_drafter(store) -> tuple[HierarchicalDrafter, StatisticsDB]:
    stats = StatisticsDB(store, "tiny")
    config = DrafterConfig(max_key=2, min_context_key=2, max_depth=4, max_candidates=4, max_nodes=10,
                           min_share=0.0, min_count=1)
    return HierarchicalDrafter(config, None, stats), stats


def fill_statistics(store, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    counted = table.count_ngrams(torch.randint(0, VOCAB, (500,), generator=gen).tolist(), 2, 4)
    store.set_many({full_key("tiny", k): table.encode(table.merge([], ((c, t) for t, c in v.items()), 4))
                    for k, v in counted.items()})


def test_redis_outage_mid_generation_keeps_output_and_recovers(redis_server):
    torch.set_num_threads(1)
    target = tiny_runner(21, vocab=VOCAB)
    store = RedisStore(redis_server.url, timeout=0.05, retry_seconds=0.2)
    fill_statistics(store, 0)
    drafter, stats_db = statistics_drafter(store)
    decoder = HierarchicalDecoder([target], [], proposer=drafter)
    plain = HierarchicalDecoder([target], []).generate(PROMPT, SamplingParams(), 60).token_ids

    generation = decoder.start(PROMPT, SamplingParams(), 60)
    out = []
    for chunk in generation:
        out.extend(chunk)
        if len(out) >= 10 and redis_server.proc is not None:
            redis_server.stop()  # Redis goes away in the middle of the generation
            stats_db.clear_cache()  # and the local cache is cold: every lookup needs Redis
    assert out == plain
    assert store.stats.errors >= 1 and store.stats.misses >= 1

    redis_server.start()  # comes back empty: refill, as an operator would rebuild
    fill_statistics(store, 0)
    time.sleep(0.3)  # past retry_seconds: the circuit closes again
    stats_db.clear_cache()
    again = decoder.generate(PROMPT, SamplingParams(), 60)
    assert again.token_ids == plain
    assert again.stats.sources.get("statistics") and again.stats.sources["statistics"].drafted > 0


def test_model_db_mirror_shares_outputs_between_replicas(redis_server):
    from drafter_db.model_db import ModelDB
    from drafter_db.shared_outputs import SharedOutputs

    def replica() -> ModelDB:
        return ModelDB(max_key=2, mirror=SharedOutputs(redis_server.url, "ns", sync_seconds=0.0))

    a, b = replica(), replica()
    a.add_output([1, 2, 3, 4, 5])
    assert b.lookup(ngram_key([1, 2])) == (0, ())
    b.sync()
    assert b.lookup(ngram_key([1, 2])) == a.lookup(ngram_key([1, 2])) != (0, ())
    a.sync()  # its own output is not counted twice
    assert a.lookup(ngram_key([1, 2]))[0] == b.lookup(ngram_key([1, 2]))[0] == 1
    late = replica()  # a replica that starts later catches up
    late.sync()
    assert late.lookup(ngram_key([1, 2])) == a.lookup(ngram_key([1, 2]))

    redis_server.stop()  # an outage costs sharing, never the local model DB
    a.add_output([7, 8, 9])
    b.sync()
    assert a.lookup(ngram_key([7, 8]))[0] and a.mirror.errors >= 1
