"""Shard reader for distillation: memory-mapped Arrow shards, a seeded global shuffle per epoch,
disjoint per-rank micro batches, a resumable cursor and pad-to-longest collation.

The shard format (written by data_prep) is described in data_prep/shards.py: Arrow IPC stream files with
`input_ids` / `token_type_ids` list columns and a `manifest.json` naming the tokenizer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import MANIFEST, read_manifest, read_shard
from minimoe_common.cli import InputError
from minimoe_common.files import file_sha256


class ShardDataset:
    """All samples of a shard dir, zero-copy views into memory-mapped Arrow files.

    `dataset[i]` -> (input_ids, token_type_ids), two 1-D numpy arrays of the sample's length.

    Shards damaged after the build are refused, naming the file: row and token counts against the manifest, ids
    within the vocabulary and segment ids 0/1 (always: one pass over the tokens), the sha256 with `verify`."""

    def __init__(self, shard_dir: str | Path, verify: bool = False):
        self.dir = Path(shard_dir)
        self.manifest_path = self.dir / MANIFEST
        self.manifest = read_manifest(self.dir)
        # Per shard: flat token arrays and row offsets, so sample i is values[offsets[i]:offsets[i + 1]].
        self._ids, self._types, self._offsets, counts = [], [], [], []
        vocab_size = self.manifest["tokenizer"]["vocab_size"]
        for entry in self.manifest["shards"]:
            path = self.dir / entry["file"]
            if verify and path.is_file() and file_sha256(path) != entry["sha256"]:
                raise InputError(f"{path}: its sha256 is not the one in {MANIFEST}: changed after the build; rebuild it")
            table = read_shard(self.dir, entry)
            ids, types = (table.column(name).combine_chunks() for name in ("input_ids", "token_type_ids"))
            self._offsets.append(ids.offsets.to_numpy())
            self._ids.append(ids.values.to_numpy(zero_copy_only=True))
            self._types.append(types.values.to_numpy(zero_copy_only=True))
            counts.append(table.num_rows)
            for name, values, bound in (("token id", self._ids[-1], vocab_size), ("segment id", self._types[-1], 2)):
                if len(values) and int(values.max()) >= bound:
                    raise InputError(f"{path}: {name} {int(values.max())} is not below {bound}: damaged after the "
                                     f"build; rebuild it")
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first sample
        tokenizer = self.manifest["tokenizer"]
        self.fingerprint: str = tokenizer["fingerprint"]
        self.pad_id: int = tokenizer["special_ids"]["pad_token"]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = index - self._starts[shard]
        begin, end = self._offsets[shard][row], self._offsets[shard][row + 1]
        return self._ids[shard][begin:end], self._types[shard][begin:end]

    def check_fingerprint(self, fingerprint: str, teacher: str) -> None:
        """Refuse shards tokenized with another vocabulary than the teacher's (their ids would mean other words)."""
        if self.fingerprint != fingerprint:
            raise ValueError(f"{self.manifest_path}: tokenizer fingerprint {self.fingerprint[:12]}... differs from the "
                             f"teacher's ({fingerprint[:12]}..., {teacher}); rebuild the shards with the teacher's "
                             f"tokenizer (python -m data_prep build --tokenizer {teacher} ...)")


def collate(samples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a micro batch to its own longest sample: input_ids, token_type_ids, attention_mask, each (B, T) int64."""
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(samples), length), dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, (ids, types) in enumerate(samples):
        input_ids[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        token_type_ids[row, : len(ids)] = torch.from_numpy(types.astype(np.int64))
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


@dataclass
class DataCursor:
    """Where the data stream stands; identical on every rank, so it resumes onto any world size."""

    epoch: int = 0
    """Epochs completed."""
    position: int = 0
    """Samples of the current epoch's permutation consumed by all ranks together."""
    samples_seen: int = 0
    """Samples consumed by all ranks since the start of training."""


class ShardLoader:
    """Endless stream of this rank's micro batches.

    Every micro step consumes `micro_batch_size * world_size` consecutive indices of the epoch's
    permutation (seeded by (seed, epoch)); rank r takes the r-th slice of them, so ranks see disjoint
    samples and the union over ranks does not depend on the world size. The tail of an epoch
    shorter than one global micro batch is skipped (at most world_size * micro_batch_size - 1 samples)."""

    def __init__(self, dataset: ShardDataset, micro_batch_size: int, rank: int, world_size: int, seed: int):
        self.dataset, self.micro_batch_size, self.rank, self.world_size, self.seed = dataset, micro_batch_size, rank, world_size, seed
        self.global_micro = micro_batch_size * world_size
        if len(dataset) < self.global_micro:
            raise ValueError(f"{dataset.manifest_path}: {len(dataset)} samples, fewer than one global micro batch "
                             f"({micro_batch_size} x {world_size} ranks)")
        self.cursor = DataCursor()
        self._permutation_epoch, self._permutation = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The global sample order of an epoch: the same on every rank and every run with this seed."""
        if epoch != self._permutation_epoch:
            self._permutation = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.dataset))
            self._permutation_epoch = epoch
        return self._permutation

    def next_indices(self) -> np.ndarray:
        """This rank's sample indices for the next micro batch; advances the cursor."""
        if self.cursor.position + self.global_micro > len(self.dataset):
            self.cursor.epoch, self.cursor.position = self.cursor.epoch + 1, 0
        begin = self.cursor.position + self.rank * self.micro_batch_size
        indices = self.permutation(self.cursor.epoch)[begin : begin + self.micro_batch_size]
        self.cursor.position += self.global_micro
        self.cursor.samples_seen += self.global_micro
        return indices

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate([self.dataset[int(i)] for i in self.next_indices()], self.dataset.pad_id)

    def state_dict(self) -> dict[str, int]:
        return asdict(self.cursor)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = DataCursor(**state)
