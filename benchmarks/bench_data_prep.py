"""Benchmark of `python -m data_prep build` against the tokenizer alone, on real Wikipedia.

Ceiling: the fast tokenizer alone (one thread, batches of 1,000 paragraphs, ids read back) over
the same documents, read beforehand. Pipeline: the real command as a subprocess, wall time from
start to exit (Python start-up and imports included), CPU time of its process tree, peak RSS of
the tree (the sum over the driver and its workers, sampled every 0.1 s). Throughput = corpus
tokens (counted by the ceiling run) / seconds, so ratios are ratios of times. With --repeat N the
three measurements are interleaved N times and the best of each is kept (on a busy machine).
"start-up" is a re-run of a finished build: imports, tokenizer load and manifest, no work.

With --one-jsonl the files' documents are written as one jsonl file instead, built as one unit of work
(--unit-bytes above its size: how every file was built before units) and cut into units of --unit-bytes,
with each worker count, in the same run.

    python benchmarks/bench_data_prep.py                          # all 100 files of ../shared/data/wikipedia/AA
    python benchmarks/bench_data_prep.py --files 20 --repeat 3    # a subset, on a busy machine
    python benchmarks/bench_data_prep.py --one-jsonl --unit-bytes 16777216   # one 100 MB file: one unit vs 7
    python benchmarks/bench_data_prep.py --files 10 --original DIR   # and the authors' scripts (a GeneZC/MiniMoE
                                                                     # checkout) on the same files, side by side
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, like one worker process

import psutil  # noqa: E402

from data_prep.build import default_tokenizer, open_tokenizer  # noqa: E402
from data_prep.readers import ReadCounts, read_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIKIPEDIA = REPO.parent / "shared" / "data" / "wikipedia" / "AA"
BATCH = 1000


def tokenizer_ceiling(files: list[Path], tokenizer_path: str) -> tuple[int, float, float, float]:
    """(corpus tokens, seconds of encode_batch_fast, its CPU seconds)."""
    _, encoder = open_tokenizer(tokenizer_path)
    paragraphs = [line for f in files for doc in read_documents(f, "wikiextractor", ReadCounts())
                  for line in doc.split("\n") if line.strip()]
    batches = [paragraphs[i:i + BATCH] for i in range(0, len(paragraphs), BATCH)]
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = sum(len(e.ids) for b in batches for e in encoder.encode_batch_fast(b, add_special_tokens=False))
    return tokens, time.perf_counter() - start, time.process_time() - cpu_start


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tree(command: list[str], cwd: Path = REPO) -> tuple[float, float, int]:
    """(seconds, CPU seconds, peak RSS bytes of the process tree) of one command."""
    start, cpu_start = time.perf_counter(), children_cpu_seconds()
    process = psutil.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(command[:6])} ... exited with {process.returncode}")
    return seconds, children_cpu_seconds() - cpu_start, peak


def run_build(files: list[Path], workers: int, output: str, *extra: str) -> tuple[float, float, int]:
    """One `data_prep build` into `output`, measured by run_tree."""
    return run_tree([sys.executable, "-m", "data_prep", "build", "--input", *map(str, files), "--output", output,
                     "--workers", str(workers), *extra])


def authors_code(original: Path, out: Path) -> Path:
    """A copy of the authors' checkout whose TFRecord protobuf module is regenerated for today's protobuf (theirs
    predates protobuf 4 and runs only on its pure-Python fallback, 18% slower on one file): the same descriptor,
    read from their file's serialized_pb literal, built by protobuf's current builder."""
    if importlib.util.find_spec("crc32c") is None:
        sys.exit("error: the authors' TFRecord writer needs crc32c: pip install crc32c")
    shutil.copytree(original, out, ignore=shutil.ignore_patterns(".git"))
    module = out / "data" / "example_pb2.py"
    literal = re.search(r"serialized_pb=_b\(('(?:[^'\\]|\\.)*')\)", module.read_text())
    if literal is None:
        sys.exit(f"error: {module}: no serialized_pb literal (not GeneZC/MiniMoE's data/example_pb2.py?)")
    descriptor = ast.literal_eval(literal[1]).encode("latin-1")
    module.write_text("from google.protobuf import descriptor_pool\nfrom google.protobuf.internal import builder\n"
                      f"DESCRIPTOR = descriptor_pool.Default().AddSerializedFile({descriptor!r})\n"
                      "builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())\n"
                      "builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'example_pb2', globals())\n")
    return out


def run_original(code: Path, files: list[Path], workers: int, tokenizer_path: str,
                 tmp: Path) -> tuple[float, float, int]:
    """The authors' two steps (GeneZC/MiniMoE scripts/bert_format_wiki.sh, then bert_build_wiki.sh: sentences,
    then BertTokenizer pairs into TFRecords) with `workers` processes on the same files, measured as one run."""
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "in").mkdir(parents=True)
    for f in files:  # their --input_regex "wiki_*" over one dir
        (tmp / "in" / f.name).symlink_to(f)
    steps = [["run_formatting_data_wiki.py", "--input_dir", tmp / "in", "--input_regex", "wiki_*",
              "--output_dir", tmp / "formatted"],
             ["run_building_data_bert.py", "--input_dir", tmp / "formatted", "--input_regex", "wiki_*.format",
              "--output_dir", tmp / "built", "--tokenizer_name_or_path", tokenizer_path, "--do_lower_case",
              "--max_seq_length", "128"]]
    measured = [run_tree([sys.executable, *map(str, step), "--num_processors", str(workers)], cwd=code)
                for step in steps]
    return sum(m[0] for m in measured), sum(m[1] for m in measured), max(m[2] for m in measured)


def one_jsonl(files: list[Path], workers: list[int], unit_bytes: int, repeat: int, tokenizer_path: str) -> None:
    """The files' documents as one jsonl file: built as one unit, then cut into units of `unit_bytes`."""
    with tempfile.TemporaryDirectory() as tmp:
        big, output = Path(tmp) / "all.jsonl", Path(tmp) / "out"
        with open(big, "w", encoding="utf-8") as f:
            for path in files:
                documents = read_documents(path, "wikiextractor", ReadCounts())
                f.writelines(json.dumps({"text": doc}) + "\n" for doc in documents)
        tokens = tokenizer_ceiling(files, tokenizer_path)[0]
        units = -(-big.stat().st_size // unit_bytes)
        layouts = {"one unit (before)": 1 << 50, f"{units} units of {unit_bytes / 2**20:.4g} MiB (after)": unit_bytes}
        best: dict[tuple[str, int], tuple[float, float, int]] = {}
        for _ in range(repeat):
            for layout, size in layouts.items():
                for count in workers:
                    shutil.rmtree(output, ignore_errors=True)
                    measured = run_build([big], count, str(output), "--format", "jsonl", "--unit-bytes", str(size))
                    best[layout, count] = min(best.get((layout, count), measured), measured)
        megabytes = big.stat().st_size / 1e6
    print(f"one jsonl file of {len(files)} files' documents ({megabytes:.0f} MB, {tokens:,} tokens), best of {repeat}, "
          f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after")
    print()
    print("| layout | workers | seconds | tokens/s | / 1 worker | / one unit | CPU s | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    before = next(iter(layouts))
    for (layout, count), (seconds, cpu, peak) in best.items():
        one, whole = best.get((layout, 1)), best[before, count]
        speedup = f"{one[0] / seconds:.2f}" if one else ""
        print(f"| {layout} | {count} | {seconds:.1f} | {tokens / seconds:,.0f} | {speedup} | {whole[0] / seconds:.2f} "
              f"| {cpu:.1f} | {peak / 2**20:,.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=WIKIPEDIA, help="WikiExtractor directory (default: %(default)s)")
    parser.add_argument("--files", type=int, default=0, help="use only the first N files (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default: 1 2)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions, best kept (default: 1)")
    parser.add_argument("--one-jsonl", action="store_true", help="the files as one jsonl file, one unit vs cut")
    parser.add_argument("--unit-bytes", type=int, default=16 << 20, help="with --one-jsonl (default: %(default)s)")
    parser.add_argument("--original", type=Path, help="a checkout of GeneZC/MiniMoE: also run the authors' data "
                                                      "scripts on the same files with each worker count")
    args = parser.parse_args()
    files = sorted(p for p in args.input.iterdir() if p.is_file())[:args.files or None]
    if not files:
        sys.exit(f"error: no input files in {args.input}")
    tokenizer_path = default_tokenizer()
    if args.one_jsonl:
        one_jsonl(files, args.workers, args.unit_bytes, args.repeat, tokenizer_path)
        return
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    load_before = os.getloadavg()[0]
    best: dict = {}
    for _ in range(args.repeat):
        measured = {"ceiling": tokenizer_ceiling(files, tokenizer_path)}
        with tempfile.TemporaryDirectory() as output:
            for workers in args.workers:
                shutil.rmtree(output)
                measured[workers] = run_build(files, workers, output)
            measured["start-up"] = run_build(files, 1, output)
            code = authors_code(args.original, Path(output) / "MiniMoE") if args.original else None
            for workers in args.workers if args.original else ():
                measured["original", workers] = run_original(code, files, workers, tokenizer_path,
                                                             Path(output) / "original")
        for key, value in measured.items():
            best[key] = min(best.get(key, value), value, key=lambda v: v[1] if key == "ceiling" else v[0])
    tokens, backend_seconds, backend_cpu = best.pop("ceiling")
    startup = best.pop("start-up")
    original = {key[1]: best.pop(key) for key in list(best) if isinstance(key, tuple)}
    runs = best

    print(f"{len(files)} files of {args.input} ({megabytes:.0f} MB, {tokens:,} tokens), best of {args.repeat}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after")
    print()
    print("| run | seconds | tokens/s | / ceiling | / ceiling, start-up excluded | / 1 worker | CPU s | CPU / ceiling's | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| tokenizer alone, encode_batch_fast (ceiling) | {backend_seconds:.1f} | {tokens / backend_seconds:,.0f} | 1.00 "
          f"| | | {backend_cpu:.1f} | 1.00 | |")
    one = runs.get(1, (None,))[0]
    for workers, (seconds, cpu, peak) in runs.items():
        speedup = f"{one / seconds:.2f}" if one else ""
        print(f"| data_prep build, {workers} worker{'s' * (workers > 1)} | {seconds:.1f} | {tokens / seconds:,.0f} "
              f"| {backend_seconds / seconds:.2f} | {backend_seconds / (seconds - startup[0]):.2f} | {speedup} | {cpu:.1f} | {backend_cpu / cpu:.2f} | {peak / 2**20:,.0f} MiB |")
    print(f"| start-up of the command (included above) | {startup[0]:.1f} | | | | | {startup[1]:.1f} | | {startup[2] / 2**20:,.0f} MiB |")
    for workers, (seconds, cpu, peak) in original.items():
        ours = f" (data_prep build: {seconds / runs[workers][0]:.2f}x faster)" if workers in runs else ""
        print(f"| the authors' scripts, {workers} process{'es' * (workers > 1)}{ours} | {seconds:.1f} | "
              f"{tokens / seconds:,.0f} | {backend_seconds / seconds:.2f} | | | {cpu:.1f} | {backend_cpu / cpu:.2f} | "
              f"{peak / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
