"""The build's settings (one typed dataclass; the CLI flags are generated from it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from minimoe_common.cli import InputError, check_output_dir

FORMATS = ("wikiextractor", "jsonl", "parquet", "arrow", "text")


class DataPrepError(InputError):
    """Bad input or settings of data prep: the CLI prints `error: <message>` and exits with status 2."""


@dataclass
class BuildConfig:
    """Settings of `python -m data_prep build`."""

    input: list[str]
    """Input files, directories (searched recursively) or globs. Each file is cut into units of work
    (see unit-bytes), one shard each: shard-NNNNN.arrow, NNNNN the unit's position over all files in order."""
    output: str
    """Output directory: shards, a stats JSON per finished shard, manifest.json."""
    format: str = field(default="wikiextractor", metadata={"choices": FORMATS})
    """Input format. wikiextractor: <doc ...> blocks; jsonl and parquet: a `text` field per document
    (as in the Hugging Face wikipedia dumps); arrow: a Hugging Face datasets dir written by save_to_disk
    (or one split of it) or its Arrow cache files, `text` column; text: one document per blank-line-separated block."""
    text_column: str = "text"
    """The field (jsonl) or column (parquet, arrow) holding a document's text."""
    unit_bytes: int = 64 << 20
    """Size of a unit of work: jsonl, text and wikiextractor files are cut every unit-bytes bytes (a
    document belongs to the unit its first byte is in), parquet files into runs of row groups and Arrow
    files into runs of record batches of about unit-bytes uncompressed. Fixed by the files and this
    setting alone, so the shards do not depend on --workers or the partitions."""
    tokenizer: str | None = None
    """Local Hugging Face fast tokenizer directory (with tokenizer.json); default: the packaged teacher's."""
    max_seq_length: int = 128
    """Length of a sample, [CLS] A [SEP] B [SEP] included."""
    short_seq_prob: float = 0.1
    """Probability that a document's target length is drawn uniformly from [2, max-seq-length - 3]
    instead of the maximum (BERT's create_pretraining_data.py)."""
    seed: int = 12345
    """Random seed; each chunk of documents is seeded from (seed, unit position, chunk position)."""
    chunk_documents: int = 1000
    """Documents a worker holds at once; the random-next B of a pair comes from another document of
    the same chunk."""
    workers: int = 0
    """Worker processes (0: one per CPU core). The output does not depend on it."""
    num_partitions: int = 1
    """Split the units into this many partitions, one batch job each (e.g. a Slurm array; unit i goes
    to partition i % num-partitions); after all of them, `python -m data_prep merge OUTPUT` writes manifest.json."""
    partition_index: int = 0
    """Which partition this job builds, 0 <= index < num-partitions (e.g. $SLURM_ARRAY_TASK_ID)."""

    def __post_init__(self) -> None:
        if self.max_seq_length < 5:
            raise DataPrepError(f"--max-seq-length {self.max_seq_length}: must be >= 5 ([CLS] a [SEP] b [SEP])")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise DataPrepError(f"--short-seq-prob {self.short_seq_prob}: must be in [0, 1]")
        if self.chunk_documents < 2:
            raise DataPrepError(f"--chunk-documents {self.chunk_documents}: must be >= 2 (random-next B needs another document)")
        if self.unit_bytes < 1:
            raise DataPrepError(f"--unit-bytes {self.unit_bytes}: must be >= 1")
        if self.workers < 0:
            raise DataPrepError(f"--workers {self.workers}: must be >= 0")
        if not 0 <= self.partition_index < self.num_partitions:
            raise DataPrepError(f"--partition-index {self.partition_index}: must be in [0, --num-partitions {self.num_partitions})")
        check_output_dir(self.output, "--output")

    def content_args(self) -> dict:
        """The settings the shards depend on, recorded in manifest.json (not workers, partitions or
        output: a build gives the same bytes whatever they are)."""
        return {k: v for k, v in asdict(self).items() if k not in ("output", "workers", "num_partitions", "partition_index")}
