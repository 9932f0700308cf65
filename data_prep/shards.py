"""The shard format: Arrow IPC stream files plus manifest.json.

Columns: input_ids list<uint16> (list<int32> when the vocabulary has more than 65536 ids),
token_type_ids list<uint8> (0 up to and including the first [SEP], 1 after), is_random_next bool.
Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.config import DataPrepError
from data_prep.pairs import Pair
from minimoe_common.files import read_json

MANIFEST = "manifest.json"
FORMAT_NAME = "minimoe-shards"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_schema(id_dtype: np.dtype) -> pa.Schema:
    return pa.schema([
        ("input_ids", pa.list_(pa.from_numpy_dtype(id_dtype))),
        ("token_type_ids", pa.list_(pa.uint8())),
        ("is_random_next", pa.bool_()),
    ])


def pairs_to_batch(tokens: np.ndarray, pairs: list[Pair], cls_id: int, sep_id: int) -> pa.RecordBatch:
    """[CLS] A [SEP] B [SEP] rows gathered from the flat token array in a few vectorised steps."""
    spans = np.array(pairs, dtype=np.int64).reshape(-1, 5)  # (N, 5): a_start, a_end, b_start, b_end, random
    length_a, length_b = spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2]
    offsets = np.zeros(len(spans) + 1, dtype=np.int32)
    np.cumsum(length_a + length_b + 3, out=offsets[1:])
    row = offsets[:-1]
    ids = np.empty(offsets[-1], dtype=tokens.dtype)
    ids[row] = cls_id
    ids[_ranges(row + 1, length_a)] = tokens[_ranges(spans[:, 0], length_a)]
    ids[row + 1 + length_a] = sep_id
    ids[_ranges(row + 2 + length_a, length_b)] = tokens[_ranges(spans[:, 2], length_b)]
    ids[offsets[1:] - 1] = sep_id
    segments = np.stack([length_a + 2, length_b + 1], axis=1).ravel()  # ([CLS] A [SEP], B [SEP]) per row
    types = np.repeat(np.tile(np.array([0, 1], dtype=np.uint8), len(spans)), segments)
    return pa.record_batch([
        pa.ListArray.from_arrays(offsets, ids),
        pa.ListArray.from_arrays(offsets, types),
        pa.array(spans[:, 4].astype(bool)),
    ], schema=shard_schema(tokens.dtype))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + n) for s, n in zip(starts, lengths)), without a Python loop."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


MANIFEST_KEYS = ("tokenizer", "max_seq_length", "shards", "totals", "skipped")


def read_manifest(directory: Path) -> dict:
    """A shard dir's manifest.json, checked: JSON, this format and version, the keys readers use."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataPrepError(f"{path}: not found (build shards with `python -m data_prep build`; after partitions: "
                            f"python -m data_prep merge {directory})")
    try:
        manifest = read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPrepError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (FORMAT_NAME, FORMAT_VERSION):
        raise DataPrepError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataPrepError(f"{path}: lacks {', '.join(missing)}")
    return manifest


def read_shard(directory: Path, entry: dict) -> pa.Table:
    """One shard of the manifest, memory-mapped, its row count checked against the manifest's."""
    path = Path(directory) / entry["file"]
    try:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowException) as e:  # missing, truncated, not an Arrow stream
        raise DataPrepError(f"{path}: cannot read the shard ({e}); rebuild it (the same build command redoes "
                            f"shards whose stats file is deleted)") from None
    tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0
    for what, found in (("samples", table.num_rows), ("tokens", tokens)):
        expected = entry[f"num_{what}"]
        if found != expected:
            raise DataPrepError(f"{path}: {found} {what} but {MANIFEST} says {expected}")
    return table
