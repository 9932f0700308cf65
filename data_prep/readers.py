"""Input files -> units of work -> documents (one str each, lines = paragraphs), streamed.

Formats: WikiExtractor (`<doc id=.. url=.. title=..>` ... `</doc>`), jsonl, parquet and Arrow with a
`text` field (the Hugging Face `wikipedia` dumps; Arrow: a `datasets` save_to_disk dir or its cache
files), and plain text (one document per block of lines separated by a blank line). Broken documents
are counted in `ReadCounts`, never dropped silently; a file that cannot be read at all is a
`DataPrepError`.

A unit is a span of one file, fixed by the file and `unit_bytes` alone (`plan_units`): a byte range
of a line-based file (its documents are those that start in it, so no document is cut), a run of
row groups of a parquet file, a run of record batches of an Arrow file.
"""
from __future__ import annotations

import glob
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.config import DataPrepError

# Files picked from a directory given as --input (WikiExtractor and text files have no suffix).
_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "arrow": (".arrow",)}
_TITLE = re.compile(r'title="([^"]*)"')
# Invalid UTF-8 is decoded with surrogateescape (one lone surrogate per bad byte), then counted
# and replaced by U+FFFD here.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
FIRST_BAD_LINES = 5  # line numbers of malformed jsonl lines kept per unit, to say where they are


@dataclass
class ReadCounts:
    """What a reader had to repair or skip in one unit."""

    malformed_documents: int = 0
    """WikiExtractor documents without `</doc>`; jsonl lines that are not an object with a str
    text field; parquet and Arrow rows whose text is null. (WikiExtractor ones are kept, the others skipped.)"""
    replaced_bytes: int = 0
    """Bytes of invalid UTF-8, each replaced by U+FFFD."""
    stray_lines: int = 0
    """Non-empty WikiExtractor lines outside any `<doc>`, skipped."""
    first_bad_lines: list[int] = field(default_factory=list)
    """Line numbers, within the unit, of its first malformed jsonl lines (up to FIRST_BAD_LINES)."""
    lines: int = 0
    """jsonl lines read: with those of the file's units before, first_bad_lines' numbers in the file."""


Span = tuple[int, int]


def resolve_inputs(patterns: list[str], fmt: str) -> list[Path]:
    """Files named by --input (files, directories searched recursively, globs), in the order given,
    each directory or glob sorted, duplicates dropped. A pattern that names nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(p for p in Path(pattern).rglob("*") if _wanted(p, fmt) and _is_input_file(p))
        elif os.path.isfile(pattern):
            found = [Path(pattern)]
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise DataPrepError(f"--input {pattern}: no such file (or no {fmt} file in it)")
        files.extend(found)
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise DataPrepError(f"{unreadable[0]}: permission denied")
    return list(dict.fromkeys(files))


def _is_input_file(path: Path) -> bool:
    """A file inside an --input dir; a symlink to nothing there is an error, as a missing file given by name."""
    if path.is_symlink() and not path.exists():
        raise DataPrepError(f"{path}: dangling symlink (to {os.readlink(path)})")
    return path.is_file()


def _wanted(path: Path, fmt: str) -> bool:
    return not path.name.startswith(".") and (fmt not in _SUFFIXES or path.name.endswith(_SUFFIXES[fmt]))


def plan_units(files: list[Path], fmt: str, unit_bytes: int, text_column: str) -> list[tuple[Path, Span]]:
    """Every file's units of work, in order, as (file, span): byte ranges of unit_bytes for the line-based
    formats; runs of row groups (parquet) or record batches (Arrow) closed once they hold unit_bytes
    uncompressed. One unit for a file smaller than that, or empty."""
    units: list[tuple[Path, Span]] = []
    for path in files:
        try:
            if fmt == "parquet":
                meta = _parquet(path, text_column).metadata
                spans = _runs([meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)], unit_bytes)
            elif fmt == "arrow":
                with pa.memory_map(str(path)) as source:  # reads the batches' headers, not their data
                    spans = _runs([batch.nbytes for batch in _arrow_stream(source, path, text_column)], unit_bytes)
            else:
                size = path.stat().st_size
                spans = [(start, min(start + unit_bytes, size)) for start in range(0, max(size, 1), unit_bytes)]
        except DataPrepError:
            raise
        except (OSError, ValueError, pa.ArrowException) as e:  # a corrupt or foreign file
            raise DataPrepError(f"{path}: cannot read as {fmt}: {e}") from None
        units += [(path, span) for span in spans]
    return units


def _runs(sizes: list[int], unit_bytes: int) -> list[Span]:
    """[start, end) runs of consecutive items, each closed once it holds unit_bytes (the last may hold less)."""
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= unit_bytes:
            runs.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes) or not runs:
        runs.append((start, len(sizes)))
    return runs


def read_documents(path: Path, fmt: str, counts: ReadCounts, span: Span | None = None,
                   text_column: str = "text") -> Iterator[str]:
    """Documents of one file, or of its unit `span` (from plan_units), streamed; counts what was repaired or skipped."""
    try:
        if fmt == "parquet":
            yield from read_parquet(path, span, text_column, counts)
        elif fmt == "arrow":
            yield from read_arrow(path, span, text_column, counts)
        else:
            lines = _unit_lines(path, span, _STARTS_DOCUMENT[fmt])
            yield from read_jsonl(lines, text_column, counts) if fmt == "jsonl" else _LINE_READERS[fmt](lines, counts)
    except DataPrepError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:  # a corrupt or foreign file
        raise DataPrepError(f"{path}: cannot read as {fmt}: {e}") from None


def _unit_lines(path: Path, span: Span | None, starts_document: Callable[[str], bool]) -> Iterator[str]:
    """The lines of the documents that start in the byte range `span` (None: the whole file), decoded.

    The unit's lines run from the first document start at or after span's start (byte 0 for the first
    unit) to the first one at or after its end, so the units of a file cut it at document starts and
    every line is read by exactly one of them, whatever the document sizes."""
    start, end = span or (0, math.inf)
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of the line holding byte start - 1 began in the unit before
        position, inside = f.tell(), start == 0
        for raw in f:
            # Invalid UTF-8 -> a lone surrogate per bad byte (see _repair); \r\n and \r -> \n, as text mode reads them
            line = raw.decode("utf-8", "surrogateescape")
            if "\r" in line:
                line = line.replace("\r\n", "\n").replace("\r", "\n")
            if starts_document(line):
                if position >= end:
                    return
                inside = True
            if inside:
                yield line
            position += len(raw)


def _repair(text: str, counts: ReadCounts) -> str:
    text, n = _ESCAPED_BYTE.subn("\ufffd", text)
    counts.replaced_bytes += n
    return text


def read_wikiextractor(lines: Iterable[str], counts: ReadCounts) -> Iterator[str]:
    """`<doc ... title="T">`, the title line, the paragraphs, `</doc>`. A document without its
    closing tag ends at the next `<doc` or at the end of the unit and is counted as malformed."""
    body: list[str] | None = None  # the open document's lines, None between documents
    title = ""
    for line in lines:
        if line.startswith("<doc"):
            if body is not None:
                counts.malformed_documents += 1
                yield _wiki_body(body, title, counts)
            match = _TITLE.search(line)
            title, body = (html.unescape(match.group(1)) if match else ""), []
        elif line.startswith("</doc>"):
            if body is None:
                counts.stray_lines += 1
            else:
                yield _wiki_body(body, title, counts)
                body = None
        elif body is not None:
            body.append(line)
        elif line.strip():
            counts.stray_lines += 1
    if body is not None:
        counts.malformed_documents += 1
        yield _wiki_body(body, title, counts)


def _wiki_body(lines: list[str], title: str, counts: ReadCounts) -> str:
    if lines and title and lines[0].strip() == title:
        lines = lines[1:]
    return _repair("".join(lines), counts)


def read_jsonl(lines: Iterable[str], text_column: str, counts: ReadCounts) -> Iterator[str]:
    """One JSON object per line with a str text field; other lines are counted as malformed."""
    for line in lines:
        counts.lines += 1
        if not line.strip():
            continue
        try:
            text = json.loads(line).get(text_column)
        except (ValueError, AttributeError):
            text = None
        if isinstance(text, str):
            yield _repair(text, counts)
        else:
            counts.malformed_documents += 1
            if len(counts.first_bad_lines) < FIRST_BAD_LINES:
                counts.first_bad_lines.append(counts.lines)


def read_text(lines: Iterable[str], counts: ReadCounts) -> Iterator[str]:
    """One document per block of lines; blocks are separated by blank lines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield _repair("".join(block), counts)
            block = []
    if block:
        yield _repair("".join(block), counts)


def read_parquet(path: Path, span: Span | None, text_column: str, counts: ReadCounts) -> Iterator[str]:
    """The text column of row groups [start, end) (None: all), read a batch at a time."""
    row_groups = range(*span) if span else None
    parquet = _parquet(path, text_column)
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_column], row_groups=row_groups):
        yield from _texts(batch.column(0), counts)


def read_arrow(path: Path, span: Span | None, text_column: str, counts: ReadCounts) -> Iterator[str]:
    """The text column of record batches [start, end) (None: all) of an Arrow IPC stream: a Hugging Face
    `datasets` file (save_to_disk's data-*.arrow, the cache's *.arrow), memory-mapped."""
    start, end = span or (0, math.inf)
    with pa.memory_map(str(path)) as source:
        for i, batch in enumerate(_arrow_stream(source, path, text_column)):
            if i >= end:
                break
            if i >= start:
                yield from _texts(batch.column(text_column), counts)


def _parquet(path: Path, text_column: str) -> pq.ParquetFile:
    parquet = pq.ParquetFile(path)
    _check_text_column(path, parquet.schema_arrow, text_column)
    return parquet


def _arrow_stream(source: pa.NativeFile, path: Path, text_column: str) -> pa.ipc.RecordBatchStreamReader:
    reader = pa.ipc.open_stream(source)
    _check_text_column(path, reader.schema, text_column)
    return reader


def _check_text_column(path: Path, schema: pa.Schema, text_column: str) -> None:
    if text_column not in schema.names:
        raise DataPrepError(f"{path}: no {text_column!r} column (columns: {', '.join(schema.names)}; "
                            "see --text-column)")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataPrepError(f"{path}: column {text_column!r} holds {kind}, not strings")


def _texts(column: pa.Array, counts: ReadCounts) -> Iterator[str]:
    """The strings of a column; null rows are counted as malformed."""
    for text in column.to_pylist():
        if text is None:
            counts.malformed_documents += 1
        else:
            yield text


# A document's first line, where a unit may begin (jsonl: every line; text: the blank lines between blocks).
_STARTS_DOCUMENT: dict[str, Callable[[str], bool]] = {
    "wikiextractor": lambda line: line.startswith("<doc"), "jsonl": lambda line: True,
    "text": lambda line: not line.strip(),
}
_LINE_READERS: dict[str, Callable[[Iterable[str], ReadCounts], Iterator[str]]] = {
    "wikiextractor": read_wikiextractor, "text": read_text,
}
