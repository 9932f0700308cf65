"""Input files -> documents (one str each, lines = paragraphs), streamed.

Formats: WikiExtractor (`<doc id=.. url=.. title=..>` ... `</doc>`), jsonl and parquet with a
`text` field (the Hugging Face `wikipedia` dumps), and plain text (one document per block of
lines separated by a blank line). Broken documents are counted in `ReadCounts`, never dropped
silently; a file that cannot be read at all is a `DataPrepError`.
"""
from __future__ import annotations

import glob
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.config import DataPrepError

# Files picked from a directory given as --input (WikiExtractor and text files have no suffix).
_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
_TITLE = re.compile(r'title="([^"]*)"')
# Invalid UTF-8 is decoded with surrogateescape (one lone surrogate per bad byte), then counted
# and replaced by U+FFFD here.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
FIRST_BAD_LINES = 5  # line numbers of malformed jsonl lines kept per file, to say where they are


@dataclass
class ReadCounts:
    """What a reader had to repair or skip in one file."""

    malformed_documents: int = 0
    """WikiExtractor documents without `</doc>`; jsonl lines that are not an object with a str
    `text`; parquet rows whose `text` is null. (WikiExtractor ones are kept, the others skipped.)"""
    replaced_bytes: int = 0
    """Bytes of invalid UTF-8, each replaced by U+FFFD."""
    stray_lines: int = 0
    """Non-empty WikiExtractor lines outside any `<doc>`, skipped."""
    first_bad_lines: list[int] = field(default_factory=list)
    """Line numbers of the first malformed jsonl lines (up to FIRST_BAD_LINES)."""


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


def read_documents(path: Path, fmt: str, counts: ReadCounts) -> Iterator[str]:
    """Documents of one file, streamed; counts what was repaired or skipped."""
    try:
        yield from _READERS[fmt](path, counts)
    except DataPrepError:
        raise
    except (OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid on a corrupt parquet file
        raise DataPrepError(f"{path}: cannot read as {fmt}: {e}") from None


def _open_text(path: Path):
    return open(path, encoding="utf-8", errors="surrogateescape")


def _repair(text: str, counts: ReadCounts) -> str:
    text, n = _ESCAPED_BYTE.subn("\ufffd", text)
    counts.replaced_bytes += n
    return text


def read_wikiextractor(path: Path, counts: ReadCounts) -> Iterator[str]:
    """`<doc ... title="T">`, the title line, the paragraphs, `</doc>`. A document without its
    closing tag ends at the next `<doc` or at the end of the file and is counted as malformed."""
    lines: list[str] | None = None  # the open document's lines, None between documents
    title = ""
    with _open_text(path) as f:
        for line in f:
            if line.startswith("<doc"):
                if lines is not None:
                    counts.malformed_documents += 1
                    yield _wiki_body(lines, title, counts)
                match = _TITLE.search(line)
                title, lines = (html.unescape(match.group(1)) if match else ""), []
            elif line.startswith("</doc>"):
                if lines is None:
                    counts.stray_lines += 1
                else:
                    yield _wiki_body(lines, title, counts)
                    lines = None
            elif lines is not None:
                lines.append(line)
            elif line.strip():
                counts.stray_lines += 1
    if lines is not None:
        counts.malformed_documents += 1
        yield _wiki_body(lines, title, counts)


def _wiki_body(lines: list[str], title: str, counts: ReadCounts) -> str:
    if lines and title and lines[0].strip() == title:
        lines = lines[1:]
    return _repair("".join(lines), counts)


def read_jsonl(path: Path, counts: ReadCounts) -> Iterator[str]:
    """One JSON object per line with a str `text` field; other lines are counted as malformed."""
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (ValueError, AttributeError):
                text = None
            if isinstance(text, str):
                yield _repair(text, counts)
            else:
                counts.malformed_documents += 1
                if len(counts.first_bad_lines) < FIRST_BAD_LINES:
                    counts.first_bad_lines.append(number)


def read_parquet(path: Path, counts: ReadCounts) -> Iterator[str]:
    """The `text` column, read a row group batch at a time; null rows are counted as malformed."""
    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise DataPrepError(f"{path}: no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
    kind = parquet.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataPrepError(f"{path}: column 'text' holds {kind}, not strings")
    for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is None:
                counts.malformed_documents += 1
            else:
                yield text


def read_text(path: Path, counts: ReadCounts) -> Iterator[str]:
    """One document per block of lines; blocks are separated by blank lines."""
    lines: list[str] = []
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield _repair("".join(lines), counts)
                lines = []
    if lines:
        yield _repair("".join(lines), counts)


_READERS: dict[str, Callable[[Path, ReadCounts], Iterator[str]]] = {
    "wikiextractor": read_wikiextractor, "jsonl": read_jsonl, "parquet": read_parquet, "text": read_text,
}
