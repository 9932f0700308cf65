"""python -m data_prep inspect DIR: manifest summary, sample length histogram, decoded samples, and with
--verify the shards' sha256 against the manifest (after a copy to a cluster, before a long run)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.build import open_tokenizer, summary_line
from data_prep.config import DataPrepError
from data_prep.shards import MANIFEST, read_manifest, read_shard
from minimoe_common.files import file_sha256

HISTOGRAM_BINS = 8
BAR_WIDTH = 40


def inspect_output(output: str, num_samples: int, verify: bool = False) -> None:
    manifest = read_manifest(Path(output))
    tok = manifest["tokenizer"]
    print(f"{output}: {summary_line(manifest)}")
    print(f"tokenizer {tok['path']} (vocab {tok['vocab_size']}, fingerprint {tok['fingerprint'][:12]}), "
          f"max_seq_length {manifest['max_seq_length']}, seed {manifest['seed']}, "
          f"random-next B {manifest['totals']['random_next'] / max(manifest['totals']['num_samples'], 1):.1%}")
    if verify:
        verify_checksums(Path(output), manifest)
    lengths = []
    for shard in manifest["shards"]:
        ids = read_shard(Path(output), shard).column("input_ids")
        lengths.append(ids.combine_chunks().value_lengths().to_numpy(zero_copy_only=False))
    _print_histogram(np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32), manifest["max_seq_length"])
    _print_samples(Path(output), manifest, num_samples)


def verify_checksums(output: Path, manifest: dict) -> None:
    """Every shard's sha256 equals manifest.json's and the totals are the sums of its shards' counts, or a
    DataPrepError naming the first shard or total that differs."""
    for key in ("num_samples", "num_tokens"):
        if manifest["totals"].get(key) != sum(shard[key] for shard in manifest["shards"]):
            raise DataPrepError(f"{output / MANIFEST}: totals.{key} {manifest['totals'].get(key)} is not the sum over "
                                f"its shards (edited after the build?)")
    for shard in manifest["shards"]:
        path = output / shard["file"]
        if not path.is_file():
            raise DataPrepError(f"{path}: missing (listed in {output / MANIFEST})")
        if file_sha256(path) != shard["sha256"]:
            raise DataPrepError(f"{path}: sha256 differs from {output / MANIFEST} (corrupt or changed after the build)")
    print(f"verified: the sha256 of all {len(manifest['shards'])} shards match the manifest")


def _print_histogram(lengths: np.ndarray, max_seq_length: int) -> None:
    counts, edges = np.histogram(lengths, bins=HISTOGRAM_BINS, range=(0, max_seq_length))
    print(f"sample lengths (tokens, special tokens included): mean {lengths.mean() if len(lengths) else 0:.1f}")
    for count, low, high in zip(counts, edges, edges[1:]):
        bar = "#" * round(BAR_WIDTH * count / max(counts.max(), 1))
        print(f"  {low:5.0f}-{high:<5.0f} {count:9,d} {bar}")


def _print_samples(output: Path, manifest: dict, num_samples: int) -> None:
    shards = [s for s in manifest["shards"] if s["num_samples"]]
    if not shards or num_samples <= 0:
        return
    tokenizer, _ = open_tokenizer(manifest["tokenizer"]["path"])
    rows = read_shard(output, shards[0]).slice(0, num_samples).to_pylist()
    for i, row in enumerate(rows):
        print(f"--- sample {i} of {shards[0]['file']} (is_random_next={row['is_random_next']}, {len(row['input_ids'])} tokens)")
        print(tokenizer.decode(row["input_ids"]))
