"""Finetuning tasks: GLUE (standard tsv files) and CoNLL-2003 NER (IOB2 column files).

One small table, `TASKS`, says for each task where its files are, which columns hold the texts and
the label, the label set and the metrics. Readers are strict: a malformed line or a label outside
the task's set is an error naming the file and line, never skipped.
"""
from __future__ import annotations

import csv
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from minimoe_common.cli import InputError

csv.field_size_limit(sys.maxsize)  # some GLUE sentences exceed csv's default 128 KiB field limit

CONLL_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


# Invalid UTF-8 is read with surrogateescape (one lone surrogate per bad byte), so that it can be reported
# with its line number instead of a UnicodeDecodeError somewhere in a buffer.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class DataError(InputError):
    """A task file that cannot be read: the message starts with `file:line:`."""


@dataclass(frozen=True)
class Task:
    """How to read one task and score it."""

    name: str
    """Canonical name (GLUE's lower-case names, e.g. "sst2", "mnli"; "conll2003")."""
    folder: str
    """Folder holding the files in the GLUE / CoNLL distributions (e.g. "SST-2")."""
    kind: str
    """"classification", "regression" (one output, MSE) or "token" (one label per word)."""
    labels: tuple[str, ...]
    """Label strings as written in the files; the class index is the position. Empty for regression."""
    text_columns: tuple[str | int, ...]
    """Header names (or column indices for header-less files) of the one or two input texts."""
    label_column: str | int
    """Header name (or column index) of the label."""
    train_file: str
    """Training file name inside the task folder."""
    dev_files: dict[str, str]
    """Result name -> dev file name ("mnli-m" and "mnli-mm" for MNLI)."""
    metrics: tuple[str, ...]
    """Metric names (see pipeline.metrics.METRICS); the first is the one the paper reports."""
    header: bool = True
    """Whether the tsv files start with a header line (CoLA's do not)."""
    in_glue_score: bool = False
    """Whether the paper's GLUE score averages this task's numbers (every GLUE task but CoLA)."""

    @property
    def num_labels(self) -> int:
        """Size of the output layer: 1 for regression."""
        return 1 if self.kind == "regression" else len(self.labels)


def _glue(name, folder, texts, label, labels, metrics, dev=None, header=True, kind="classification",
          in_glue_score=True) -> Task:
    return Task(name, folder, kind, labels, texts, label, "train.tsv", dev or {name: "dev.tsv"}, metrics, header,
                in_glue_score)


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, Task] = {t.name: t for t in (
    _glue("sst2", "SST-2", ("sentence",), "label", BINARY, ("acc",)),
    _glue("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", BINARY, ("f1", "acc")),
    _glue("stsb", "STS-B", ("sentence1", "sentence2"), "score", (), ("spearman", "pearson"), kind="regression"),
    _glue("qqp", "QQP", ("question1", "question2"), "is_duplicate", BINARY, ("f1", "acc")),
    _glue("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
          ("acc",), dev={"mnli-m": "dev_matched.tsv", "mnli-mm": "dev_mismatched.tsv"}),
    _glue("qnli", "QNLI", ("question", "sentence"), "label", NLI2, ("acc",)),
    _glue("rte", "RTE", ("sentence1", "sentence2"), "label", NLI2, ("acc",)),
    Task("conll2003", "conll2003", "token", CONLL_LABELS, (0,), -1, "train.txt", {"conll2003": "valid.txt"},
         ("entity_f1",), header=False),
    _glue("cola", "CoLA", (3,), 1, BINARY, ("mcc",), header=False, in_glue_score=False),
)}
"""Every task, in the paper's table order (Zhang et al. 2023, Table 2: the GLUE tasks, CoNLL; CoLA is extra):
the one place that order is written. Suites run and tables list tasks in this order."""

PAPER_COLUMNS = tuple(name for task in TASKS.values() if task.in_glue_score for name in task.dev_files)
"""The 8 numbers the paper's GLUE score averages: sst2, mrpc, stsb, qqp, mnli-m, mnli-mm, qnli, rte."""


@dataclass
class Example:
    """One sequence-level example: text (pair) and label (class index, or a float for regression)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass
class TaggedSentence:
    """One CoNLL sentence: words and their IOB2 label indices."""

    words: list[str]
    labels: list[int]


def get_task(name: str) -> Task:
    """Look a task up by its GLUE name, case-insensitive, with or without '-' ("SST-2" = "sst2")."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def find_task_dir(data_dir: str | Path, task: Task) -> Path:
    """The folder holding the task's files: DATA_DIR itself, DATA_DIR/<folder> or DATA_DIR/glue/<folder>."""
    data_dir = Path(data_dir)
    names = [task.train_file, *task.dev_files.values()]
    for candidate in (data_dir, data_dir / task.folder, data_dir / "glue" / task.folder):
        if any((candidate / n).is_file() for n in names):
            return candidate
    raise FileNotFoundError(f"{data_dir}: no {task.folder} files ({', '.join(names)}) here, "
                            f"in {task.folder}/ or in glue/{task.folder}/")


def read_split(task: Task, path: str | Path) -> list[Example] | list[TaggedSentence]:
    """Read one train or dev file of the task; one without examples (e.g. only a header) is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (task {task.name})")
    examples = read_conll(task, path) if task.kind == "token" else read_tsv(task, path)
    if not examples:
        raise DataError(f"{path}: no examples (task {task.name})")
    return examples


def _open_text(path: Path):
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _check_utf8(text: str, path: Path, line: int) -> None:
    if _ESCAPED_BYTE.search(text):
        raise DataError(f"{path}:{line}: invalid UTF-8")


def read_tsv(task: Task, path: Path) -> list[Example]:
    """GLUE tsv: tab-separated, no quoting (fields may start with a literal quote), BOM tolerated."""
    with _open_text(path) as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None) if task.header else None
        if task.header:
            if header is None:
                raise DataError(f"{path}:1: empty file, expected a header line")
            _check_utf8("\t".join(header), path, 1)
            missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
            if missing:
                raise DataError(f"{path}:1: header lacks column(s) {missing} of task {task.name}; got {header}")
            columns = [header.index(c) for c in (*task.text_columns, task.label_column)]
        else:
            columns = list((*task.text_columns, task.label_column))
        width = len(header) if header else max(columns) + 1
        examples = []
        for row in rows:
            line = rows.line_num
            _check_utf8("\t".join(row), path, line)
            if len(row) != width:
                raise DataError(f"{path}:{line}: expected {width} tab-separated fields, got {len(row)}")
            texts = [row[c] for c in columns[:-1]]
            examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None,
                                    _parse_label(task, row[columns[-1]], path, line)))
    return examples


def _parse_label(task: Task, value: str, path: Path, line: int) -> int | float:
    if task.kind == "regression":
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):  # float() also reads "nan" and "inf", which would make every metric NaN
            raise DataError(f"{path}:{line}: label {value!r} is not a finite number (task {task.name} is a regression)")
        return score
    if value not in task.labels:
        raise DataError(f"{path}:{line}: label {value!r} is not one of task {task.name}'s labels {task.labels}")
    return task.labels.index(value)


def read_conll(task: Task, path: Path) -> list[TaggedSentence]:
    """CoNLL-2003 column file: `word ... NER` per line, blank line between sentences, -DOCSTART- lines skipped.

    Tags must be IOB2: an I-X tag may only follow B-X or I-X (IOB1 files must be converted first)."""
    sentences, words, labels, previous = [], [], [], "O"
    with _open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            _check_utf8(line, path, line_number)
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sentences.append(TaggedSentence(words, labels))
                words, labels, previous = [], [], "O"
                continue
            if len(fields) < 2:
                raise DataError(f"{path}:{line_number}: expected 'word ... tag' columns, got {line.rstrip()!r}")
            tag = fields[task.label_column]
            if tag not in task.labels:
                raise DataError(f"{path}:{line_number}: tag {tag!r} is not one of task {task.name}'s labels {task.labels}")
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                raise DataError(f"{path}:{line_number}: {tag} follows {previous}: not IOB2 (convert IOB1 files first)")
            words.append(fields[0])
            labels.append(task.labels.index(tag))
            previous = tag
    if words:
        sentences.append(TaggedSentence(words, labels))
    return sentences
