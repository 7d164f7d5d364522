"""`hierspec db build`: corpus -> n-gram continuation statistics -> a store (Redis or embedded).

Text files are read whole; JSONL files contribute every string they hold
(`text`, `content`, `turns`, ...). Tokens come from the target model's
tokenizer and keys are namespaced by that tokenizer, so a store can hold the
tables of several vocabularies. A build replaces the namespace's table as a
whole (`drafter_db.stores`: a new generation, one pointer switch, the old
generation deleted), so nothing of an earlier corpus stays, and a reader never
sees half a build.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drafter_db import table
from drafter_db.stores import TableStore, full_key, generation_key, generation_namespace, generations_prefix

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".html"}


@dataclass(frozen=True)
class BuildSettings:
    max_key: int = 3
    length: int = 6
    top: int = 4
    min_count: int = 2
    max_tokens: int = 5_000_000  # stop reading the corpus past this many tokens


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def iter_documents(paths: list[str]) -> Iterator[str]:
    """Documents of the corpus: files under directories (by suffix), text files, JSONL lines."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"corpus path {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"}) \
            if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".jsonl":
                for line in file.read_text(errors="replace").splitlines():
                    if line.strip():
                        try:
                            yield "\n".join(_strings(json.loads(line)))
                        except json.JSONDecodeError:
                            continue
            else:
                yield file.read_text(errors="replace")


def build_statistics(paths: list[str], tokenizer, store: TableStore, namespace: str,
                     settings: BuildSettings = BuildSettings(), batch: int = 5000) -> dict:
    """Count, rank, write a new generation of `namespace`'s table, switch readers to it, then delete every other
    generation (the one replaced, and any a failed build left) and the keys of a build from before generations;
    prints progress to stderr; returns a summary. One build of a tokenizer's table at a time: a build deletes
    what another one is writing. A corpus that yields no entry changes nothing (ValueError)."""
    started = time.monotonic()
    generation = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}".encode()
    keyspace = generation_namespace(namespace, generation)
    counts: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
    tokens_read = documents = 0
    for text in iter_documents(paths):
        ids = tokenizer.encode(text, add_special_tokens=False)
        documents += 1
        tokens_read += len(ids)
        for key, conts in table.count_ngrams(ids, settings.max_key, settings.length).items():
            bucket = counts.setdefault(key, {})
            for cont, c in conts.items():
                bucket[cont] = bucket.get(cont, 0) + c
        if documents % 50 == 0:
            print(f"\rcounting: {documents} documents, {tokens_read:,} tokens, {len(counts):,} keys",
                  end="", file=sys.stderr, flush=True)
        if tokens_read >= settings.max_tokens:
            break
    print(f"\rcounting: {documents} documents, {tokens_read:,} tokens, {len(counts):,} keys", file=sys.stderr)
    items: dict[bytes, bytes] = {}
    written = 0
    total_keys = len(counts)
    for index, (key, conts) in enumerate(counts.items(), start=1):
        ranked = table.merge([], ((c, t) for t, c in conts.items() if c >= settings.min_count), settings.top)
        if ranked:
            items[full_key(keyspace, key)] = table.encode(ranked)
        if len(items) >= batch or index == total_keys:
            store.set_many(items)
            written += len(items)
            items = {}
            print(f"\rwriting: {index:,}/{total_keys:,} keys scanned, {written:,} written", end="",
                  file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if not written:
        raise ValueError(f"the corpus ({documents} documents, {tokens_read:,} tokens) gave no n-gram seen "
                         f"{settings.min_count} times: the table in use is kept")
    store.set_many({generation_key(namespace): generation})  # readers switch here, from one whole table to another
    deleted = store.delete_prefix(generations_prefix(namespace), keep=(generation_key(namespace),
                                                                       full_key(keyspace, ())))
    deleted += store.delete_prefix(full_key(namespace, ()))  # a table from before generations
    return {"documents": documents, "tokens": tokens_read, "keys_written": written, "old_keys_deleted": deleted,
            "seconds": round(time.monotonic() - started, 1), "namespace": namespace,
            "generation": generation.decode()}
