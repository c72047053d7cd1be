"""Read an offline W&B run (`wandb/offline-run-*/run-*.wandb`) without W&B's server.

A run logged only to W&B has no CSV or JSON beside it; its transaction log is the
record of what happened. This module replays that log record by record: history
rows, config and summary updates, naming and the exit code. It needs the `wandb`
package only for the protobuf message class, imported when a file is read.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlab.errors import VitlabError

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

_WANDB_IDENT, _WANDB_MAGIC = b":W&B", 0xBEE1
_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32 of type byte + data, data length, chunk type
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _LAST = 1, 2, 4


@dataclass
class WandbRun:
    """What an offline W&B run recorded: its config, summary, history, naming and exit code."""

    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    exit_code: int | None = None


def wandb_records(path: Path) -> Iterator[Record]:
    """The protobuf records of a `run-*.wandb` file, in order.

    The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then
    32 KiB blocks of chunks (crc32, length, type FULL | FIRST | MIDDLE | LAST); a record
    may span blocks. Reading stops quietly at the first incomplete or corrupt chunk, so
    the file of a run that is still going, or that crashed, gives what it holds.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:  # created, nothing written yet
        return
    if _FILE_HEADER.unpack_from(data)[:2] != (_WANDB_IDENT, _WANDB_MAGIC):
        raise VitlabError(f"{path} is not a W&B run file (no `:W&B` header)")
    pos, chunks = _FILE_HEADER.size, []
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if room < _CHUNK_HEADER.size:  # a block's zero trailer
            pos += room
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return
        pos = start + length
        chunks = [chunk] if kind in (_FULL, _FIRST) else [*chunks, chunk]
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def read_wandb_run(path: Path) -> WandbRun:
    """Replay a `run-*.wandb` file: config and summary updates applied in order, history rows kept."""
    run = WandbRun()
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.name, run.tags = (
                record.run.run_group,
                record.run.display_name,
                list(record.run.tags),
            )
            _apply_updates_and_removals(run.config, record.run.config)
            _apply_updates_and_removals(run.summary, record.run.summary)
        elif kind == "config":
            _apply_updates_and_removals(run.config, record.config)
        elif kind == "summary":
            _apply_updates_and_removals(run.summary, record.summary)
        elif kind == "history":
            run.history.append(
                {_item_key(item): _decode_item_value(item) for item in record.history.item}
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _item_key(item: Any) -> str:
    """An item's key; a nested key (`("model", "patch_size")`) joined with dots."""
    return item.key or ".".join(item.nested_key)


def _decode_item_value(item: Any) -> Any:
    """A history item's value, from the typed `value` field where this W&B version has one, else from JSON."""
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    return json.loads(item.json) if kind == "json" else getattr(item, kind)


def _apply_updates_and_removals(target: dict[str, Any], record: Any) -> None:
    """Apply a config or summary record to `target`: its updated keys set, its removed keys dropped."""
    for item in record.update:
        target[_item_key(item)] = json.loads(item.value_json)
    for item in record.remove:
        target.pop(_item_key(item), None)
