"""The shard format (CONTRACTS.md): Arrow IPC stream files plus manifest.json.

Columns: input_ids list<uint16> (list<int32> when the vocabulary has more than 65536 ids),
token_type_ids list<uint8> (0 up to and including the first [SEP], 1 after), is_random_next bool.
Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.pairs import Pair

MANIFEST = "manifest.json"
FORMAT_NAME = "minimoe-shards"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_schema(vocab_size: int) -> pa.Schema:
    return pa.schema([
        ("input_ids", pa.list_(pa.from_numpy_dtype(token_dtype(vocab_size)))),
        ("token_type_ids", pa.list_(pa.uint8())),
        ("is_random_next", pa.bool_()),
    ])


def pairs_to_batch(pairs: list[Pair], cls_id: int, sep_id: int, schema: pa.Schema) -> pa.RecordBatch:
    """[CLS] A [SEP] B [SEP] rows, built as flat arrays plus offsets (no per-row Arrow objects)."""
    ids: list[int] = []
    segment_lengths: list[int] = []  # per row: len([CLS] A [SEP]), len(B [SEP])
    for a, b, _ in pairs:
        ids.append(cls_id)
        ids.extend(a)
        ids.append(sep_id)
        ids.extend(b)
        ids.append(sep_id)
        segment_lengths += (len(a) + 2, len(b) + 1)
    segments = np.array(segment_lengths, dtype=np.int32)
    offsets = np.zeros(len(pairs) + 1, dtype=np.int32)
    np.cumsum(segments[0::2] + segments[1::2], out=offsets[1:])
    types = np.repeat(np.tile(np.array([0, 1], dtype=np.uint8), len(pairs)), segments)
    id_type = schema.field("input_ids").type
    return pa.record_batch([
        pa.ListArray.from_arrays(offsets, pa.array(np.array(ids, dtype=id_type.value_type.to_pandas_dtype())), type=id_type),
        pa.ListArray.from_arrays(offsets, pa.array(types), type=schema.field("token_type_ids").type),
        pa.array([r for _, _, r in pairs], type=pa.bool_()),
    ], schema=schema)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON under a temporary name, then rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
