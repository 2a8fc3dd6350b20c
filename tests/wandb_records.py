"""Readers for what offline wandb wrote (its .wandb record files), shared by the tests."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks


def read_wandb_records(path: Path) -> list:
    """Decode the records of an offline run file (wandb ships the protobuf schema)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, records = path.read_bytes(), 7, b"", []  # 7-byte ':W&B' file header
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # FULL/FIRST start, MIDDLE/LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)
