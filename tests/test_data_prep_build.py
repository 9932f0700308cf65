"""`python -m data_prep build/merge/inspect` end to end with the real packaged tokenizer.

Guarantees checked: the output directory (shards, stats, plan and manifest) is byte-identical
whatever --workers, after an interrupted run is resumed, and when built as partitions + merge, also for
one file cut into several units."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.__main__ import main
from data_prep.readers import ReadCounts, read_documents
from minimoe_common.files import file_sha256
from minimoe_common.tokenizer import load_tokenizer, tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "wiki_sample" / "wiki_00"
DOC = re.compile(r"<doc [^>]*>\n.*?</doc>\n", re.S)


@pytest.fixture(scope="module")
def sample_docs() -> list[str]:
    """The 21 WikiExtractor documents of the bundled sample, as raw text blocks."""
    return DOC.findall(SAMPLE.read_text(encoding="utf-8"))


def write_wiki_files(directory: Path, docs: list[str], num_files: int, per_file: int = 3) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(num_files):
        path = directory / f"wiki_{i:02d}"
        path.write_text("".join(docs[(i * per_file + j) % len(docs)] for j in range(per_file)), encoding="utf-8")
        files.append(path)
    return files


def run(*args) -> int:
    return main([str(a) for a in args])


def build(inputs, output, teacher_dir, *extra) -> int:
    return run("build", "--input", *inputs, "--output", output, "--tokenizer", teacher_dir, "--chunk-documents", 2, *extra)


def dir_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_docs, teacher_dir):
    """7 small WikiExtractor files (one with an empty, an unclosed and a broken-UTF-8 document) and
    their build with one worker."""
    root = tmp_path_factory.mktemp("reference")
    files = write_wiki_files(root / "in", sample_docs, 7)
    with open(files[3], "ab") as f:
        f.write(b'<doc id="9" title="Empty">\nEmpty\n\n</doc>\n<doc id="10" title="Bad">\nBad\nBroken \xff byte. And \xc3 more.\n'
                b'More text, with [SEP] and [CLS] written in it.\n')
    assert build(files, root / "out", teacher_dir, "--workers", 1) == 0
    return files, root / "out"


def test_manifest_describes_the_shards(reference, teacher_dir):
    files, out = reference
    manifest = json.loads((out / "manifest.json").read_text())
    tokenizer = load_tokenizer(str(teacher_dir))
    assert manifest["format"] == "minimoe-shards" and manifest["version"] == 1
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert manifest["tokenizer"]["vocab_size"] == 30522
    assert manifest["tokenizer"]["special_ids"]["cls_token"] == 101 and manifest["tokenizer"]["special_ids"]["sep_token"] == 102
    assert manifest["max_seq_length"] == 128 and manifest["seed"] == 12345 and manifest["args"]["chunk_documents"] == 2
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.arrow" for i in range(7)]
    assert [s["source"] for s in manifest["shards"]] == [str(f) for f in files]
    assert [s["span"] for s in manifest["shards"]] == [[0, f.stat().st_size] for f in files]  # one unit per file
    samples = tokens = 0
    for shard in manifest["shards"]:
        path = out / shard["file"]
        assert file_sha256(path) == shard["sha256"]
        table = pa.ipc.open_stream(path).read_all()
        assert table.schema.field("input_ids").type == pa.list_(pa.uint16())
        assert table.num_rows == shard["num_samples"] > 0
        for ids in table.column("input_ids").to_pylist():  # "[SEP]" written in a document is text
            assert ids[0] == 101 and ids.count(101) == 1 and ids.count(102) == 2 and ids[-1] == 102
        assert len(table.column("input_ids").combine_chunks().values) == shard["num_tokens"]
        dataset = datasets.Dataset.from_file(str(path))
        assert len(dataset) == shard["num_samples"] and set(dataset.column_names) == {"input_ids", "token_type_ids", "is_random_next"}
        samples, tokens = samples + shard["num_samples"], tokens + shard["num_tokens"]
    assert manifest["totals"]["num_samples"] == samples and manifest["totals"]["num_tokens"] == tokens
    assert manifest["totals"]["documents"] == 7 * 3 + 1  # + the unclosed one; the empty one is skipped
    assert manifest["skipped"] == {"empty_documents": 1, "malformed_documents": 1, "stray_lines": 0, "replaced_bytes": 2}
    assert not list(out.glob("*.tmp"))


def test_two_workers_give_identical_bytes(reference, tmp_path, teacher_dir):
    files, out = reference
    assert build(files, tmp_path / "two", teacher_dir, "--workers", 2) == 0
    assert dir_bytes(tmp_path / "two") == dir_bytes(out)


def test_partitions_then_merge_equal_one_build(reference, tmp_path, teacher_dir, capsys):
    files, out = reference
    parts = tmp_path / "parts"
    for index in (2, 0):
        assert build(files, parts, teacher_dir, "--workers", 1, "--num-partitions", 3, "--partition-index", index) == 0
    assert not (parts / "manifest.json").exists()
    assert run("merge", parts) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {parts}: 2 of 7 shards not built yet (first: shard-00001.arrow")
    assert build(files, parts, teacher_dir, "--workers", 1, "--num-partitions", 3, "--partition-index", 1) == 0
    assert run("merge", parts) == 0
    assert dir_bytes(parts) == dir_bytes(out)


def test_rerun_skips_finished_shards_and_redoes_broken_ones(reference, tmp_path, teacher_dir):
    files, out = reference
    again = tmp_path / "again"
    assert build(files, again, teacher_dir, "--workers", 1) == 0
    finished = again / "shard-00000.arrow"
    os.utime(finished, (0, 0))
    (again / "shard-00001.stats.json").unlink()  # killed between the shard's rename and its stats
    with open(again / "shard-00002.arrow", "r+b") as f:  # a shard that does not match its stats
        f.truncate(100)
    (again / "shard-00003.arrow.tmp").write_bytes(b"half-written")
    (again / "manifest.json").unlink()
    assert build(files, again, teacher_dir, "--workers", 1) == 0
    assert finished.stat().st_mtime == 0  # not rebuilt
    leftover = again / "shard-00003.arrow.tmp"
    assert leftover.exists()  # shard 3 was complete: its stale temporary is left alone...
    leftover.unlink()  # ...and is the only difference
    assert dir_bytes(again) == dir_bytes(out)


def test_resume_after_kill_gives_identical_bytes(tmp_path, sample_docs, teacher_dir):
    files = write_wiki_files(tmp_path / "in", sample_docs, 40, per_file=2)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "data_prep", "build", "--input", *map(str, files), "--output", str(killed),
               "--tokenizer", str(teacher_dir), "--workers", "2", "--chunk-documents", "2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("*.stats.json"))) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its workers, mid-run
    process.wait()
    done = len(list(killed.glob("*.stats.json")))
    assert 5 <= done < 40 and not (killed / "manifest.json").exists()
    assert build(files, killed, teacher_dir, "--workers", 2) == 0
    assert build(files, tmp_path / "clean", teacher_dir, "--workers", 1) == 0
    for leftover in killed.glob("*.tmp"):
        leftover.unlink()
    assert dir_bytes(killed) == dir_bytes(tmp_path / "clean")


def test_all_formats_give_the_same_shards(reference, tmp_path, teacher_dir):
    files, out = reference
    bodies = [[doc for doc in read_documents(f, "wikiextractor", ReadCounts())] for f in files[:3]]
    inputs = {"jsonl": [], "parquet": [], "arrow": [], "text": []}
    for i, docs in enumerate(bodies):
        jsonl = tmp_path / f"part{i}.jsonl"
        jsonl.write_text("".join(json.dumps({"id": j, "text": d}) + "\n" for j, d in enumerate(docs)), encoding="utf-8")
        parquet = tmp_path / f"part{i}.parquet"
        pq.write_table(pa.table({"text": docs}), parquet)
        saved = tmp_path / f"saved{i}"  # a Hugging Face datasets dir
        datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(str(saved))
        text = tmp_path / f"part{i}.txt"
        text.write_text("\n\n".join("\n".join(line for line in d.split("\n") if line.strip()) for d in docs), encoding="utf-8")
        for fmt, path in (("jsonl", jsonl), ("parquet", parquet), ("arrow", saved), ("text", text)):
            inputs[fmt].append(path)
    for fmt, paths in inputs.items():
        assert build(paths, tmp_path / fmt, teacher_dir, "--workers", 1, "--format", fmt) == 0
        for i in range(3):
            assert (tmp_path / fmt / f"shard-{i:05d}.arrow").read_bytes() == (out / f"shard-{i:05d}.arrow").read_bytes(), fmt


@pytest.mark.parametrize("fmt", ["jsonl", "arrow"])
def test_a_file_cut_into_units_is_built_alike_by_any_workers_and_partitions(fmt, tmp_path, teacher_dir, capsys):
    texts = list(read_documents(SAMPLE, "wikiextractor", ReadCounts()))
    path = tmp_path / ("all.jsonl" if fmt == "jsonl" else "cache-all.arrow")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    else:  # a Hugging Face datasets cache file in record batches of 2 documents
        datasets.Dataset.from_dict({"text": texts}).map(lambda b: b, batched=True, batch_size=2, writer_batch_size=2,
                                                        cache_file_name=str(path))
    one, two, parts = tmp_path / "one", tmp_path / "two", tmp_path / "parts"
    assert build([path], one, teacher_dir, "--format", fmt, "--unit-bytes", 100_000, "--workers", 1) == 0
    manifest = json.loads((one / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 4 and {s["source"] for s in manifest["shards"]} == {str(path)}
    assert manifest["totals"]["documents"] == len(texts)  # each document in exactly one unit
    assert build([path], two, teacher_dir, "--format", fmt, "--unit-bytes", 100_000, "--workers", 2) == 0
    for index in (2, 0, 1):
        assert build([path], parts, teacher_dir, "--format", fmt, "--unit-bytes", 100_000, "--workers", 1,
                     "--num-partitions", 3, "--partition-index", index) == 0
    assert run("merge", parts) == 0
    assert dir_bytes(two) == dir_bytes(one) == dir_bytes(parts)
    assert build([path], one, teacher_dir, "--format", fmt, "--unit-bytes", 50_000) == 2  # other units: another build
    assert capsys.readouterr().err.endswith("(args, units differ); use another --output or delete it\n")
    assert build([path], tmp_path / "whole", teacher_dir, "--format", fmt, "--unit-bytes", 10**12) == 0  # one unit
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert len(whole["shards"]) == 1 and whole["totals"]["documents"] == len(texts)


def test_bad_jsonl_lines_are_numbered_in_their_file_across_units(tmp_path, teacher_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n\n".join(json.dumps({"title": i}) for i in range(12)) + "\n", encoding="utf-8")
    assert build([path], tmp_path / "out", teacher_dir, "--format", "jsonl", "--unit-bytes", 20) == 2
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["units"][1] == [str(path), 20, 40]
    assert capsys.readouterr().err.endswith(f"(12 malformed lines, first: {path}:1, {path}:3, {path}:5, {path}:7, "
                                            f"{path}:9)\n")


def test_other_settings_in_the_same_output_are_refused(reference, capsys, teacher_dir):
    files, out = reference
    assert build(files, out, teacher_dir, "--seed", 7) == 2
    assert capsys.readouterr().err == f"error: {out} holds a build with other settings (args, seed differ); use another --output or delete it\n"


@pytest.mark.parametrize("args,message", [
    (["build", "--input", "/nonexistent/wiki_*", "--output", "{tmp}/o"], "error: --input /nonexistent/wiki_*: no such file"),
    (["build", "--input", "{sample}", "--output", "{tmp}/o", "--tokenizer", "{tmp}"], "error: --tokenizer {tmp}: cannot load"),
    (["build", "--input", "{sample}", "--output", "{tmp}/o", "--num-partitions", "2", "--partition-index", "2"],
     "error: --partition-index 2: must be in [0, --num-partitions 2)"),
    (["build", "--input", "{sample}", "--output", "{tmp}/o", "--max-seq-length", "4"], "error: --max-seq-length 4: must be >= 5"),
    (["build", "--input", "{sample}", "--output", "{tmp}/o", "--unit-bytes", "0"], "error: --unit-bytes 0: must be >= 1"),
    (["build", "--format", "arrow", "--input", "{sample}", "--output", "{tmp}/o"], "error: {sample}: cannot read as arrow: "),
    (["merge", "{tmp}"], "error: {tmp}: no plan.json"),
    (["inspect", "{tmp}"], "error: {tmp}/manifest.json: not found"),
])
def test_cli_errors_are_one_line_with_exit_2(args, message, tmp_path, capsys):
    fill = {"tmp": str(tmp_path), "sample": str(SAMPLE)}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(**fill)) and err.count("\n") == 1


def test_cli_missing_file_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", str(tmp_path / "missing"), "--output",
                             str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: --input {tmp_path / 'missing'}: no such file (or no wikiextractor file in it)\n"


def test_inspect_prints_histogram_and_decoded_samples(reference, capsys):
    _, out = reference
    assert run("inspect", out, "--samples", 2) == 0
    text = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    histogram = [int(m.replace(",", "")) for m in re.findall(r"^\s+\d+-\d+\s+([\d,]+)", text, re.M)]
    assert sum(histogram) == manifest["totals"]["num_samples"]
    assert text.count("[CLS]") == 2 and text.count("[SEP]") == 4


def test_inspect_verify_names_a_changed_shard(reference, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(reference[1], copy)
    assert run("inspect", copy, "--samples", 0, "--verify") == 0
    assert "verified: the sha256 of all 7 shards match the manifest" in capsys.readouterr().out
    shard = copy / "shard-00004.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 1  # one flipped bit, in the ids of the last batch
    shard.write_bytes(bytes(data))
    assert run("inspect", copy, "--samples", 0, "--verify") == 2
    assert capsys.readouterr().err == f"error: {shard}: sha256 differs from {copy / 'manifest.json'} (corrupt or changed after the build)\n"


def normalize(text: str) -> str:
    """Lower case, accents stripped, letters and digits only: what survives an uncased WordPiece round trip."""
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if c.isalnum() and not unicodedata.combining(c))


def test_real_wikipedia_decodes_back_to_input_text(shared_data, teacher_dir, tmp_path):
    files = sorted((shared_data / "wikipedia" / "AA").iterdir())[:2]
    assert build(files, tmp_path / "out", teacher_dir, "--workers", 2) == 0
    tokenizer = load_tokenizer(str(teacher_dir))
    corpus = normalize("".join(d for f in files for d in read_documents(f, "wikiextractor", ReadCounts())))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["num_samples"] > 1000
    dataset = datasets.Dataset.from_file(str(tmp_path / "out" / "shard-00000.arrow"))
    checked = 0
    for row in dataset.select(range(0, len(dataset), 25)):
        ids = row["input_ids"]
        first_sep = ids.index(tokenizer.sep_token_id)
        for segment in (ids[1:first_sep], ids[first_sep + 1:-1]):
            for piece in tokenizer.decode(segment).split(tokenizer.unk_token):
                if len(normalize(piece)) > 3:
                    assert normalize(piece) in corpus
                    checked += 1
    assert checked > 50


def test_data_prep_does_not_import_transformers(tmp_path, teacher_dir):
    """Importing transformers costs seconds in the driver and in every worker: data prep reads tokenizers with the
    `tokenizers` library alone."""
    code = ("import sys\nfrom data_prep.__main__ import main\n"
            f"assert main(['build', '--input', {str(REPO / 'examples/data/wiki_sample')!r}, '--output', "
            f"{str(tmp_path / 'out')!r}, '--tokenizer', {str(teacher_dir)!r}, '--workers', '1']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, teacher_dir):
    """A write over the file size limit (RLIMIT_FSIZE, as a full disk: the write fails, EFBIG here, ENOSPC there):
    one line naming the shard, exit 1, no half-written shard counted; the same command finishes once there is room."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ

    out = tmp_path / "out"
    args = [sys.executable, "-m", "data_prep", "build", "--input", str(REPO / "examples/data/wiki_sample"),
            "--output", str(out), "--tokenizer", str(teacher_dir), "--workers", "1"]
    full = subprocess.run(args, capture_output=True, text=True, cwd=REPO, preexec_fn=small_files, timeout=300)
    assert full.returncode == 1
    assert re.fullmatch(rf"error: {out / 'shard-00000.arrow'}: .*File too large; shards finished so far are kept: "
                        r"rerun the same command to go on", full.stderr.strip().splitlines()[-1])
    assert not (out / "manifest.json").exists() and sorted(p.name for p in out.iterdir()) == ["plan.json"]
    again = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "manifest.json").read_text())["totals"]["num_samples"] > 0
