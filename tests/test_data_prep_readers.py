"""Readers: WikiExtractor (malformed input), jsonl, parquet, text; input resolution errors."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.config import DataPrepError
from data_prep.readers import ReadCounts, read_documents, resolve_inputs


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
    with pytest.raises(DataPrepError, match=r"bad\.parquet: no 'text' column \(columns: id, body\)"):
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
