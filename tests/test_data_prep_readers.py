"""Readers: WikiExtractor (malformed input), jsonl, parquet, Arrow (Hugging Face datasets), text; units of work
(every document read once whatever the split); input resolution errors."""
from __future__ import annotations

import json
import os

from dataclasses import asdict
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.config import DataPrepError
from data_prep.readers import ReadCounts, plan_units, read_documents, resolve_inputs


def read(path, fmt="wikiextractor"):
    counts = ReadCounts()
    return list(read_documents(path, fmt, counts)), counts


def test_wikiextractor_drops_title_and_keeps_paragraphs(tmp_path):
    path = tmp_path / "wiki_00"
    path.write_text('<doc id="1" url="u" title="Anarchism">\nAnarchism\n\nFirst paragraph.\nSecond one.\n</doc>\n'
                    '<doc id="2" url="u" title="A &amp; B">\nA & B\nBody of two.\n</doc>\n', encoding="utf-8")
    docs, counts = read(path)
    assert docs == ["\nFirst paragraph.\nSecond one.\n", "Body of two.\n"]
    assert counts == ReadCounts()


def test_wikiextractor_missing_close_tag_ends_at_next_doc_and_at_eof(tmp_path):
    path = tmp_path / "wiki_00"
    path.write_text('<doc id="1" title="One">\nOne\nUnclosed text.\n'
                    '<doc id="2" title="Two">\nTwo\nClosed text.\n</doc>\n'
                    'stray line\n'
                    '<doc id="3" title="Three">\nThree\nCut at EOF.\n', encoding="utf-8")
    docs, counts = read(path)
    assert docs == ["Unclosed text.\n", "Closed text.\n", "Cut at EOF.\n"]
    assert counts.malformed_documents == 2
    assert counts.stray_lines == 1


def test_wikiextractor_invalid_utf8_replaced_and_counted(tmp_path):
    path = tmp_path / "wiki_00"
    path.write_bytes(b'<doc id="1" title="T">\nT\ncaf\xc3\xa9 ok, bad \xff\xfe here, cut \xe2\x82\n</doc>\n')
    docs, counts = read(path)
    assert docs == ["caf\u00e9 ok, bad \ufffd\ufffd here, cut \ufffd\ufffd\n"]
    assert counts.replaced_bytes == 4


def test_wikiextractor_empty_documents_are_yielded_for_the_builder_to_count(tmp_path):
    path = tmp_path / "wiki_00"
    path.write_text('<doc id="1" title="Empty">\nEmpty\n\n</doc>\n<doc id="2" title="X">\nX\nText.\n</doc>\n', encoding="utf-8")
    docs, _ = read(path)
    assert [d.strip() for d in docs] == ["", "Text."]


def test_jsonl_text_field_and_malformed_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"id": 1, "title": "T", "text": "Hello there.\nSecond paragraph."}), "{not json", json.dumps([1, 2]),
             json.dumps({"title": "no text"}), "", json.dumps({"text": "Two."})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, counts = read(path, "jsonl")
    assert docs == ["Hello there.\nSecond paragraph.", "Two."]
    assert counts.malformed_documents == 3


def test_parquet_text_column_streamed(tmp_path):
    path = tmp_path / "train-00000.parquet"
    table = pa.table({"id": ["1", "2", "3"], "title": ["a", "b", "c"], "text": ["First doc.", None, "Third doc."]})
    pq.write_table(table, path, row_group_size=2)
    docs, counts = read(path, "parquet")
    assert docs == ["First doc.", "Third doc."]
    assert counts.malformed_documents == 1


def test_parquet_without_text_column_names_the_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    with pytest.raises(DataPrepError, match=r"bad\.parquet: no 'text' column \(columns: id, body; see --text-column\)"):
        read(path, "parquet")


def test_corrupt_parquet_is_a_one_line_error(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataPrepError, match=r"corrupt\.parquet: cannot read as parquet"):
        read(path, "parquet")


def test_text_blocks_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\nDoc one line one.\nDoc one line two.\n\n   \n\nDoc two.\n\n", encoding="utf-8")
    docs, _ = read(path, "text")
    assert docs == ["Doc one line one.\nDoc one line two.\n", "Doc two.\n"]


def test_resolve_inputs_files_dirs_globs_in_order(tmp_path):
    (tmp_path / "AB").mkdir()
    (tmp_path / "AA").mkdir()
    for name in ["AB/wiki_01", "AB/wiki_00", "AA/wiki_00", "AA/.hidden"]:
        (tmp_path / name).write_text("x")
    found = resolve_inputs([str(tmp_path / "AB"), str(tmp_path / "A*" / "wiki_00"), str(tmp_path / "AB" / "wiki_00")],
                           "wikiextractor")
    assert found == [tmp_path / "AB/wiki_00", tmp_path / "AB/wiki_01", tmp_path / "AA/wiki_00"]


def test_resolve_inputs_filters_suffix_for_parquet_dirs(tmp_path):
    (tmp_path / "a.parquet").write_text("x")
    (tmp_path / "README.md").write_text("x")
    assert resolve_inputs([str(tmp_path)], "parquet") == [tmp_path / "a.parquet"]


def test_missing_input_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataPrepError, match=r"--input .*nope\*: no such file"):
        resolve_inputs([str(tmp_path / "nope*")], "wikiextractor")


def test_file_gone_at_read_time_is_an_error(tmp_path):
    with pytest.raises(DataPrepError, match=r"wiki_99: cannot read as wikiextractor: .*No such file"):
        read(tmp_path / "wiki_99")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_input_is_an_error(tmp_path):
    path = tmp_path / "wiki_00"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(DataPrepError, match="permission denied"):
        resolve_inputs([str(path)], "wikiextractor")


def read_units(path: Path, fmt: str, unit_bytes: int, text_column: str = "text") -> tuple[int, list[str], dict]:
    """(number of units, the documents of all units in order, their counts summed; bad lines numbered in the file)."""
    units = plan_units([path], fmt, unit_bytes, text_column)
    docs, total = [], asdict(ReadCounts())
    for _, span in units:
        counts = ReadCounts()
        docs += read_documents(path, fmt, counts, span, text_column)
        total["first_bad_lines"] += [total["lines"] + n for n in counts.first_bad_lines]
        for key, value in asdict(counts).items():
            if key != "first_bad_lines":
                total[key] += value
    total["first_bad_lines"] = total["first_bad_lines"][:5]
    return len(units), docs, total


LINE_FILES = {
    "wikiextractor": (b'stray at the start\n<doc id="1" title="One">\nOne\nFirst. Text.\n</doc>\nstray\n\n'
                      b'<doc id="2" title="Two">\r\nTwo\r\nCRLF text.\r\n</doc>\r\n<doc id="3" title="Three">\nThree\n'
                      b'Unclosed \xff here.\n<doc id="4" title="Four">\nFour\n' + b"A long line. " * 40 + b"\n</doc>\n"
                      b'<doc id="5" title="Cut">\nCut\nat the end'),
    "jsonl": b"".join(json.dumps({"text": f"Document {i}. " * (i % 7 + 1)}).encode() + b"\n" if i % 5 else b"{broken\n"
                      for i in range(40)) + b'\n{"text": "bad \xff byte"}\r\n{"text": "no newline at the end"}',
    "text": b"\n\nBlock one.\nLine two.\n\n   \n\n"
            + b"".join(b"Block %d, " % i * (i % 5 + 1) + b"\n\n" for i in range(30))
            + b"Last \xfe block,\r\nno newline",
}


@pytest.mark.parametrize("fmt", LINE_FILES)
@pytest.mark.parametrize("unit_bytes", [1, 7, 50, 333, 10**6])
def test_byte_range_units_read_every_document_once(tmp_path, fmt, unit_bytes):
    path = tmp_path / "input"
    path.write_bytes(LINE_FILES[fmt])
    whole_docs, whole_counts = read(path, fmt)
    num_units, docs, counts = read_units(path, fmt, unit_bytes)
    assert num_units == max(1, -(-len(LINE_FILES[fmt]) // unit_bytes))
    assert docs == whole_docs and counts == asdict(whole_counts)
    assert whole_counts.replaced_bytes and (whole_counts.malformed_documents or fmt == "text")  # the input has both
    assert all("\r" not in d for d in docs)


def test_parquet_units_are_runs_of_row_groups(tmp_path):
    path = tmp_path / "train.parquet"
    texts = [f"Document {i:02d}. Text." if i != 10 else None for i in range(11)]
    pq.write_table(pa.table({"id": list(range(11)), "text": texts}), path, row_group_size=2)  # 6 row groups
    group_bytes = pq.ParquetFile(path).metadata.row_group(0).total_byte_size  # (the first 5 are alike)
    for unit_bytes, spans in ((1, [(i, i + 1) for i in range(6)]), (group_bytes + 1, [(0, 2), (2, 4), (4, 6)]),
                              (10**9, [(0, 6)])):
        assert [span for _, span in plan_units([path], "parquet", unit_bytes, "text")] == spans
        _, docs, counts = read_units(path, "parquet", unit_bytes)
        assert docs == texts[:10] and counts["malformed_documents"] == 1


@pytest.fixture
def saved_dataset(tmp_path) -> tuple[Path, Path, list[str]]:
    """A Hugging Face dataset written by save_to_disk in 2 files, and a cache file of it in record batches of 3 rows."""
    texts = [f"Document {i}. It has sentences." * (i % 4 + 1) for i in range(20)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"id": list(range(20)), "text": texts}).save_to_disk(str(saved), num_shards=2)
    cache = tmp_path / "cache" / "cache-0.arrow"
    cache.parent.mkdir()
    datasets.load_from_disk(str(saved)).map(lambda batch: batch, batched=True, batch_size=3, writer_batch_size=3,
                                            cache_file_name=str(cache))
    return saved, cache, texts


def test_datasets_save_to_disk_dir_and_cache_file(saved_dataset):
    saved, cache, texts = saved_dataset
    files = resolve_inputs([str(saved)], "arrow")
    assert [f.name for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert [doc for f in files for doc in read(f, "arrow")[0]] == texts
    for unit_bytes, expected in ((1, 7), (10**9, 1)):  # 7 batches of 3 rows, the last of 2
        num_units, docs, _ = read_units(cache, "arrow", unit_bytes)
        assert num_units == expected and docs == texts


def test_text_column_names_the_field(tmp_path, saved_dataset):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": 1, "body": "The body."}) + "\n", encoding="utf-8")
    assert read_units(path, "jsonl", 10, text_column="body")[1] == ["The body."]
    with pytest.raises(DataPrepError, match=r"cache-0\.arrow: no 'body' column \(columns: id, text; see --text"):
        plan_units([saved_dataset[1]], "arrow", 10, "body")


@pytest.mark.parametrize("content", [b"not arrow at all", None])
def test_bad_arrow_file_is_a_one_line_error(tmp_path, saved_dataset, content):
    path = tmp_path / "bad.arrow"
    if content is None:  # an Arrow stream cut in the middle
        data = saved_dataset[1].read_bytes()
        content = data[:len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(DataPrepError, match=r"bad\.arrow: cannot read as arrow: ") as error:
        plan_units([path], "arrow", 10, "text")
    assert "\n" not in str(error.value)
