"""Read the records of an offline W&B run file (``run-<id>.wandb``) for assertions in tests.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32, length, type: full/first/middle/last), whose
payloads are serialized ``wandb_internal_pb2.Record`` messages. The file of a killed process may end
inside a chunk: reading stops there.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, "not a W&B run file"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # the writer pads a block tail too short for a header
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        if length == 0 and kind == 0:
            break
        if len(payload) < length:  # the file of a killed process may end inside its last chunk
            break
        expected = zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF
        assert crc == expected, f"bad chunk checksum at byte {pos}"
        pos += 7 + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        else:  # LAST
            pending += payload
        record = pb.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def history(records: list[pb.Record]) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(records: list[pb.Record]) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def metric_definitions(records: list[pb.Record]) -> dict[str, str]:
    """``define_metric`` calls: metric name or glob -> its step metric ("" when it has none)."""
    return {r.metric.name or r.metric.glob_name: r.metric.step_metric for r in records
            if r.WhichOneof("record_type") == "metric"}
