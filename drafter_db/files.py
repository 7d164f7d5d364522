"""Files of n-gram tables (the embedded statistics store, the saved model DB): data only.

These files used to be pickles, and loading a pickle runs whatever its writer
put in it: a statistics file handed around between machines could run code in
the server. This format holds bytes and lengths, nothing that executes, and a
file it cannot read is refused with one line (a damaged file, another kind, a
future version) so the server can start without it. Layout, little-endian:

    magic  b"HSTABLE\\0" | kind (16 bytes, NUL-padded) | version uint32 | records uint64
    records x (key length uint32, value length uint32, key, value)
    SHA-256 of everything above (32 bytes): a truncated or altered file does not pass

Written to a temporary file beside it first (one per writer: several router
replicas may save at once) and renamed over the old one, so a crash while
saving leaves the previous file whole.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

MAGIC = b"HSTABLE\0"
_HEAD = struct.Struct("<8s16sIQ")  # magic, kind, version, records
_RECORD = struct.Struct("<II")
_DIGEST = 32


class TableFileError(ValueError):
    """A file that is not a readable table of the expected kind and version; the message is one line."""


def write_table(path: str | os.PathLike, kind: str, version: int, records: Iterable[tuple[bytes, bytes]]) -> None:
    path = Path(path)
    if len(kind.encode()) > 16:
        raise ValueError(f"table kind {kind!r} is longer than 16 bytes")
    records = list(records)
    parts = [_HEAD.pack(MAGIC, kind.encode(), version, len(records))]
    for key, value in records:
        parts.append(_RECORD.pack(len(key), len(value)))
        parts.append(key)
        parts.append(value)
    body = b"".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(body)
            f.write(hashlib.sha256(body).digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def read_table(path: str | os.PathLike, kind: str, version: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) records of a file written by `write_table` with this kind and version."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TableFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    if len(data) < _HEAD.size + _DIGEST or data[:8] != MAGIC:
        raise TableFileError(f"{path}: not a hierspec table file (an old pickle? rebuild it)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise TableFileError(f"{path}: damaged (truncated or altered; its checksum does not match)")
    _, found_kind, found_version, count = _HEAD.unpack_from(body)
    found_kind = found_kind.rstrip(b"\0").decode(errors="replace")
    if found_kind != kind:
        raise TableFileError(f"{path}: holds a {found_kind!r} table, not {kind!r}")
    if found_version != version:
        raise TableFileError(f"{path}: format version {found_version}, this hierspec reads {version} (rebuild it)")
    records, offset = [], _HEAD.size
    for _ in range(count):
        if offset + _RECORD.size > len(body):
            raise TableFileError(f"{path}: damaged (fewer records than its header says)")
        key_length, value_length = _RECORD.unpack_from(body, offset)
        offset += _RECORD.size
        end = offset + key_length + value_length
        if end > len(body):
            raise TableFileError(f"{path}: damaged (a record runs past the end)")
        records.append((body[offset : offset + key_length], body[offset + key_length : end]))
        offset = end
    if offset != len(body):
        raise TableFileError(f"{path}: damaged (bytes after the last record)")
    return records
