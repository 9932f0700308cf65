"""pipeline.data: shard reading, per-epoch shuffle, per-rank slices, resumable cursor, collation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data import ShardDataset, ShardLoader, collate

PAD, CLS, SEP = 0, 101, 102


def write_shards(out: Path, shard_sizes: list[int], fingerprint: str = "f" * 64, seed: int = 0) -> list[list[int]]:
    """Write shards in the data_prep/shards.py format with pyarrow; return every sample's input_ids, in order.

    Sample g (global index) is [CLS] g+1000 ... [SEP] x [SEP], of length 4 + g % 5, so it decodes to its index."""
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("input_ids", pa.list_(pa.uint16())), ("token_type_ids", pa.list_(pa.uint8())),
                        ("is_random_next", pa.bool_())])
    samples, entries = [], []
    for shard, size in enumerate(shard_sizes):
        ids, types = [], []
        for _ in range(size):
            g = len(samples)
            first = [CLS] + [1000 + g] * (1 + g % 5) + [SEP]
            ids.append(first + [2000 + g, SEP])
            types.append([0] * len(first) + [1, 1])
            samples.append(ids[-1])
        table = pa.table({"input_ids": ids, "token_type_ids": types, "is_random_next": [False] * size}, schema=schema)
        name = f"shard-{shard:05d}.arrow"
        with pa.OSFile(str(out / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        entries.append({"file": name, "num_samples": size, "num_tokens": sum(map(len, ids)), "sha256": ""})
    manifest = {"format": "minimoe-shards", "version": 1,
                "tokenizer": {"path": "t", "vocab_size": 30522, "fingerprint": fingerprint,
                              "special_ids": {"cls_token": CLS, "sep_token": SEP, "pad_token": PAD}},
                "max_seq_length": 16, "seed": seed, "args": {}, "shards": entries,
                "totals": {"num_samples": len(samples)}, "skipped": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return samples


@pytest.fixture()
def shards(tmp_path):
    return tmp_path, write_shards(tmp_path, [7, 5, 11])


def test_reads_every_sample_across_shards(shards):
    path, samples = shards
    dataset = ShardDataset(path)
    assert len(dataset) == 23
    for g, expected in enumerate(samples):
        ids, types = dataset[g]
        assert ids.tolist() == expected
        first_sep = expected.index(SEP)
        assert types.tolist() == [0] * (first_sep + 1) + [1] * (len(expected) - first_sep - 1)
    assert dataset.pad_id == PAD


def test_refuses_bad_manifest_and_counts(tmp_path):
    with pytest.raises(ValueError, match="manifest.json: not found"):
        ShardDataset(tmp_path)
    write_shards(tmp_path, [3])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = 4
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard-00000.arrow: 3 samples but manifest.json says 4"):
        ShardDataset(tmp_path)
    manifest["format"] = "other"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a minimoe-shards v1 manifest"):
        ShardDataset(tmp_path)


def test_fingerprint_mismatch_is_refused(shards):
    dataset = ShardDataset(shards[0])
    dataset.check_fingerprint("f" * 64, "teacher")  # same: accepted
    with pytest.raises(ValueError, match=r"manifest.json: tokenizer fingerprint ffffffffffff\.\.\. differs from the teacher's"):
        dataset.check_fingerprint("a" * 64, "/models/teacher")


def test_collate_pads_to_longest():
    batch = collate([(np.array([CLS, 5, SEP], np.uint16), np.array([0, 0, 0], np.uint8)),
                     (np.array([CLS, 7, SEP, 8, SEP], np.uint16), np.array([0, 0, 0, 1, 1], np.uint8))], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[CLS, 5, SEP, PAD, PAD], [CLS, 7, SEP, 8, SEP]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_epoch_shuffle_is_seeded_and_covers_the_data(shards):
    dataset = ShardDataset(shards[0])
    loader = ShardLoader(dataset, micro_batch_size=5, rank=0, world_size=1, seed=3)
    epoch0 = np.concatenate([loader.next_indices() for _ in range(4)])  # 4 x 5 = 20 of 23: the tail of 3 is skipped
    assert len(set(epoch0.tolist())) == 20 and loader.cursor.epoch == 0
    first_of_epoch1 = loader.next_indices()
    assert loader.cursor.epoch == 1 and loader.cursor.samples_seen == 25
    assert first_of_epoch1.tolist() != epoch0[:5].tolist()  # a new order each epoch
    again = ShardLoader(dataset, micro_batch_size=5, rank=0, world_size=1, seed=3)
    assert again.next_indices().tolist() == epoch0[:5].tolist()  # same seed, same order
    other = ShardLoader(dataset, micro_batch_size=5, rank=0, world_size=1, seed=4)
    assert other.next_indices().tolist() != epoch0[:5].tolist()


def test_ranks_get_disjoint_slices_whose_union_matches_one_rank(shards):
    dataset = ShardDataset(shards[0])
    single = ShardLoader(dataset, micro_batch_size=4, rank=0, world_size=1, seed=0)
    ranks = [ShardLoader(dataset, micro_batch_size=2, rank=r, world_size=2, seed=0) for r in range(2)]
    for _ in range(8):  # crosses an epoch boundary (23 samples, 5 global batches of 4 per epoch)
        parts = [loader.next_indices().tolist() for loader in ranks]
        assert not set(parts[0]) & set(parts[1])
        assert parts[0] + parts[1] == single.next_indices().tolist()
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_resumed_loader_yields_identical_batches(shards):
    dataset = ShardDataset(shards[0])
    first = ShardLoader(dataset, micro_batch_size=3, rank=1, world_size=2, seed=9)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = ShardLoader(dataset, micro_batch_size=3, rank=1, world_size=2, seed=9)
    resumed.load_state_dict(state)
    for _ in range(6):
        a, b = first.next_batch(), resumed.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_few_samples_for_one_global_batch(tmp_path):
    write_shards(tmp_path, [3])
    with pytest.raises(ValueError, match=r"3 samples, fewer than one global micro batch \(2 x 2 ranks\)"):
        ShardLoader(ShardDataset(tmp_path), micro_batch_size=2, rank=0, world_size=2, seed=0)


def test_shards_damaged_after_the_build_are_refused_by_name(tmp_path):
    from minimoe_common.files import file_sha256

    write_shards(tmp_path, [3])
    shard, manifest_path = tmp_path / "shard-00000.arrow", tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = file_sha256(shard)
    manifest_path.write_text(json.dumps(manifest))
    intact = shard.read_bytes()
    first = np.array([CLS, 1000, SEP], dtype=np.uint16).tobytes()  # sample 0's first segment, once in the file
    assert intact.count(first) == 1

    def damaged(token: int) -> None:
        shard.write_bytes(intact.replace(first, np.array([CLS, token, SEP], dtype=np.uint16).tobytes()))

    damaged(0xFFE8)  # a flipped high byte: an id outside the vocabulary, caught without reading the digest
    with pytest.raises(ValueError, match=rf"^{shard}: token id 65512 is not below 30522: damaged after the build; "
                                         "rebuild it$"):
        ShardDataset(tmp_path)
    damaged(1001)  # another real id: only the sha256 tells
    assert ShardDataset(tmp_path)[0][0].tolist() == [CLS, 1001, SEP, 2000, SEP]
    with pytest.raises(ValueError, match=rf"^{shard}: its sha256 is not the one in manifest.json: changed after the "
                                         "build; rebuild it$"):
        ShardDataset(tmp_path, verify=True)
    shard.write_bytes(intact)
    assert ShardDataset(tmp_path, verify=True)[0][0].tolist() == [CLS, 1000, SEP, 2000, SEP]
