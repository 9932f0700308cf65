"""Misuse and bad input (issue 12): never a silent wrong result, never a traceback. One test per class: the
silent cases first (suite rows and recipes, non-finite labels and losses, KD teachers, resume, the tokenizer
fingerprint, empty builds, skipped tasks), then the one-line errors, then running it as users do."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_prep import __main__ as prep
from data_prep.build import open_tokenizer
from minimoe_common.cli import InputError, command
from minimoe_common.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline import compress, distill, export, report
from pipeline.data import ShardDataset
from pipeline.finetune import main as finetune_main
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.run import build_model, check_finetuned_for
from pipeline.finetune.suite import present_tasks, row_models
from pipeline.models import Student, StudentConfig
from pipeline.models.files import check_max_seq_length
from pipeline.optim import LinearSchedule
from pipeline.tasks import DataError, get_task, read_split

REPO = Path(__file__).resolve().parents[1]
# One OpenMP thread: on a shared 2-core machine spinning OpenMP threads made steps ~15x slower.
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m module args` as a user runs it: no launcher, no rank variables."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return load_tokenizer(str(teacher_dir))


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, tokenizer) -> Path:
    """A random-init 1-layer dense student with the real teacher's tokenizer."""
    path = tmp_path_factory.mktemp("tiny_student")
    torch.manual_seed(0)
    Student(StudentConfig(num_layers=1, hidden_size=32, num_heads=2, vocab_size=len(tokenizer), num_experts=1)).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def write_tsv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in [header, *rows]))
    return path


def sst2_and_rte(data: Path) -> Path:
    """SST-2 and RTE with 8 train and 4 dev rows each (SST-2: train labels mostly 1, dev 3 x 1 and 1 x 0, so the
    majority-class baseline accuracy is 75.0), and QNLI with a dev file only."""
    for task, header, rows, dev in (
            ("SST-2", "sentence\tlabel", [f"good film {i}\t1" if i % 4 else f"bad film {i}\t0" for i in range(8)],
             ["good\t1", "fine\t1", "great\t1", "awful\t0"]),
            ("RTE", "index\tsentence1\tsentence2\tlabel",
             [f"{i}\ta {i}\tb {i}\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(8)],
             [f"{i}\ta\tb\tentailment" for i in range(3)] + ["3\ta\tc\tnot_entailment"])):
        write_tsv(data / task / "train.tsv", header, rows)
        write_tsv(data / task / "dev.tsv", header, dev)
    write_tsv(data / "QNLI" / "dev.tsv", "index\tquestion\tsentence\tlabel", ["0\tq\ts\tentailment"])
    return data


# --------------------------------------------------------------------------- silent wrong results

def test_every_command_turns_errors_into_one_line_and_a_status(capsys):
    """minimoe_common.cli.command, which every minimoe-* entry point but distill's wears: bad input 2, a missing
    file 2, a diverged run 1, each `error: <message>` on stderr; anything else is a bug and propagates."""
    @command
    def run(error: Exception | None) -> None:
        if error is not None:
            raise error

    assert run(None) == 0
    for error, status in ((InputError("--lr 0: must be > 0"), 2), (FileNotFoundError("no such file: x.json"), 2),
                          (FloatingPointError("non-finite loss at step 3: loss=nan"), 1)):
        assert run(error) == status
        assert capsys.readouterr().err == f"error: {error}\n"
    with pytest.raises(KeyError):
        run(KeyError("a bug"))


def test_suite_rows_with_one_name_are_refused():
    assert row_models(["ft/rte/model", "mine=ft/mrpc/model"]) == {"model": "ft/rte/model", "mine": "ft/mrpc/model"}
    with pytest.raises(ValueError, match=r"^--model: two models named 'model' \(ft/rte/model and ft/mrpc/model\); "
                                         r"name the rows: NAME=DIR$"):
        row_models(["ft/rte/model", "ft/mrpc/model"])


def test_suite_says_which_tasks_it_skips(tmp_path):
    data = sst2_and_rte(tmp_path)
    found, skipped = present_tasks(str(data), None)
    assert [task.name for task, _ in found] == ["sst2", "rte"]
    assert list(skipped) == ["mrpc", "stsb", "qqp", "mnli", "qnli", "conll2003", "cola"]  # all but SST-2 and RTE
    assert skipped["stsb"] == f"{data}: no STS-B files (train.tsv, dev.tsv) here, in STS-B/ or in glue/STS-B/"
    assert skipped["qnli"] == f"{data / 'QNLI'}: no train.tsv"
    with pytest.raises(FileNotFoundError, match=rf"^{data / 'QNLI'}: no train.tsv$"):
        present_tasks(str(data), ["sst2", "qnli"])  # asked for by name: an error, not a skip


def test_suite_shows_progress_and_baseline_reuses_its_recipe_and_refuses_another(tmp_path, tiny_student):
    data, out = sst2_and_rte(tmp_path / "data"), tmp_path / "suite"
    suite = ["suite", "--model", f"tiny={tiny_student}", "--data-dir", str(data), "--output", str(out),
             "--epochs", "1", "--batch-size", "4", "--max-seq-length", "16"]
    first = run_module("pipeline.finetune", *suite)
    assert first.returncode == 0, first.stderr
    assert "tiny: task 1/2 sst2" in first.stderr and "tiny: task 2/2 rte" in first.stderr
    assert re.search(r"sst2: best dev acc \d+\.\d\d at step 2 \(majority-class baseline 75\.00\)", first.stderr)
    assert "skipped 7 task(s): mrpc (" in first.stderr and f"; qnli ({data / 'QNLI'}: no train.tsv);" in first.stderr
    assert (out / "results.md").read_text().endswith(
        "Not run (no files under --data-dir): mrpc, stsb, qqp, mnli, qnli, conll2003, cola.\n")
    recorded = json.loads((out / "tiny" / "sst2" / "results.json").read_text())["config"]
    assert (recorded["lr"], recorded["batch_size"], recorded["epochs"]) == ([5e-5], [4], 1.0)
    again = run_module("pipeline.finetune", *suite)  # the same recipe: results reused, nothing trained
    assert again.returncode == 0 and "best dev" not in again.stderr
    other = run_module("pipeline.finetune", *suite, "--lr", "1e-4")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'tiny' / 'sst2' / 'results.json'}: trained with another recipe (--lr [5e-05] -> [0.0001]); "
        f"use another --output, or delete {out / 'tiny' / 'sst2'} to retrain")


def test_a_suite_killed_mid_task_keeps_its_finished_tasks_and_restarts_the_killed_one(tmp_path, tiny_student):
    """SIGKILL as soon as the second task (RTE) has started: the rerun reuses SST-2's results untouched (same
    bytes, same mtime, nothing trained) and trains RTE from the start, to the table of both."""
    data, out = sst2_and_rte(tmp_path / "data"), tmp_path / "suite"
    suite = [sys.executable, "-m", "pipeline.finetune", "suite", "--model", f"tiny={tiny_student}", "--data-dir",
             str(data), "--output", str(out), "--tasks", "sst2", "rte", "--epochs", "3", "--batch-size", "2",
             "--max-seq-length", "16"]
    killed = subprocess.Popen(suite, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "tiny" / "rte").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the suite ended before RTE started"
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    finished = out / "tiny" / "sst2" / "results.json"
    before = (finished.read_bytes(), finished.stat().st_mtime_ns)
    assert not (out / "tiny" / "rte" / "results.json").exists()

    again = run_module("pipeline.finetune", *suite[3:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rte: best dev acc" in again.stderr and "sst2: best dev" not in again.stderr
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == before
    rte = json.loads((out / "tiny" / "rte" / "results.json").read_text())
    assert [h["step"] for h in rte["history"]] == [4, 8, 12]  # 8 rows / batch 2 per epoch, from step 0
    table = (out / "results.md").read_text()
    assert re.search(r"^\| tiny \| .* \| \d+\.\d \| - \| - \| - \| - \| - \| \d+\.\d \| \d+\.\d \| - \| - \|$", table, re.M), table


def test_non_finite_regression_labels_name_the_file_and_line(tmp_path):
    for value in ("nan", "inf", "-Infinity"):
        path = write_tsv(tmp_path / "train.tsv", "sentence1\tsentence2\tscore", ["a\tb\t2.5", f"a\tc\t{value}"])
        with pytest.raises(DataError, match=rf"^{path}:3: label '{value}' is not a finite number \(task stsb is a regression\)$"):
            read_split(get_task("stsb"), path)


def test_non_finite_finetune_loss_stops_the_run_naming_the_step(tmp_path, tiny_student):
    """A label of 1e30 is finite, but its square overflows float32: the MSE of the first step is inf."""
    data = tmp_path / "STS-B"
    write_tsv(data / "train.tsv", "sentence1\tsentence2\tscore", ["a\tb\t1e30", "a\tc\t1.0"])
    write_tsv(data / "dev.tsv", "sentence1\tsentence2\tscore", ["a\tb\t1.0", "a\tc\t2.0"])
    result = run_module("pipeline.finetune", "--model", str(tiny_student), "--task", "stsb", "--data-dir", str(data),
                        "--output", str(tmp_path / "out"), "--batch-size", "2", "--max-seq-length", "8")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: non-finite loss at step 1: loss=inf, aux_loss=0; "
                                                      "lower --lr or check the data")
    assert not (tmp_path / "out" / "results.json").exists()


def write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_kd_teacher_must_be_finetuned_for_the_task(tmp_path, teacher_dir):
    sst2, mnli = get_task("sst2"), get_task("mnli")
    with pytest.raises(InputError, match=rf"^--teacher {teacher_dir}: not finetuned for sst2 \(no \*ForSequenceClassification "
                                         rf"head in its config.json\); finetune it first: minimoe-finetune --model"):
        check_finetuned_for(str(teacher_dir), sst2)  # the packaged teacher: a BertModel, no head
    binary = write_config(tmp_path / "run" / "model", {"architectures": ["BertForSequenceClassification"]})
    check_finetuned_for(str(binary), sst2)  # 2 labels: transformers leaves the default id2label out
    with pytest.raises(InputError, match=rf"^--teacher {binary}: its head has 2 labels, task mnli has 3$"):
        check_finetuned_for(str(binary), mnli)
    (tmp_path / "run" / "results.json").write_text(json.dumps({"task": "rte"}))
    with pytest.raises(InputError, match=rf"^--teacher {binary}: finetuned for rte \({tmp_path / 'run' / 'results.json'}\), "
                                         rf"not sst2$"):
        check_finetuned_for(str(binary), sst2)
    legacy = write_config(tmp_path / "legacy", {"task_head": {"kind": "token_classification", "num_labels": 9}})
    check_finetuned_for(str(legacy), get_task("conll2003"))


def test_lr_schedule_extended_on_resume_goes_on_without_a_jump():
    # 2 warmup steps of 10 (factors 1/2, 1, 1, 7/8, ... 4/8 at step 6); extended at step 6 to 14 steps, the rate
    # goes on from 4/8 as 0.5 x (14 - s) / 8
    schedule = LinearSchedule(2, 10).extended(6, 14)
    assert [schedule.factor(s) for s in range(6, 15)] == [0.5, 7 / 16, 6 / 16, 5 / 16, 4 / 16, 3 / 16, 2 / 16, 1 / 16, 0.0]
    # extended during warmup: warmup ends as before, then the decay runs to the new end
    assert [LinearSchedule(4, 8).extended(1, 10).factor(s) for s in (0, 3, 4, 7, 10)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    assert LinearSchedule(2, 10).extended(6, 10) == LinearSchedule(2, 10)


def resume_state(cfg: distill.DistillConfig, step: int) -> dict:
    return {"step": step, "config": dataclasses.asdict(cfg), "schedule": dataclasses.asdict(LinearSchedule(0, 4))}


def test_resume_refuses_another_method_and_allows_more_steps(tmp_path, monkeypatch):
    from pipeline import checkpoint

    cfg = distill.DistillConfig(teacher="t", shards="s", output=str(tmp_path), max_steps=4)
    monkeypatch.setattr(checkpoint, "resume_tag", lambda root: "step-00000002")
    monkeypatch.setattr(checkpoint, "read_trainer_state", lambda step_dir: resume_state(cfg, 2))
    changed = dataclasses.replace(cfg, teacher="other", teacher_layer=-2, lr=1e-3, experts=1, max_steps=8, keep=5)
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'checkpoints' / 'step-00000002'}: --resume cannot change the distillation: --teacher 't' -> "
            f"'other'; --teacher-layer -1 -> -2; --experts None -> 1; --lr 0.0003 -> 0.001 (only --max-steps/--epochs, "
            f"the layout, --micro-batch-size and the logging flags may change)")):
        distill.checkpoint_to_resume(changed)
    longer = dataclasses.replace(cfg, max_steps=8, keep=5, micro_batch_size=16)
    state = distill.checkpoint_to_resume(longer)
    assert distill.lr_schedule(longer, 8, state) == LinearSchedule(0, 8, decay_start=2, decay_from=0.5)
    with pytest.raises(ValueError, match="give 2 steps, and the checkpoint is at step 2 already: nothing to train"):
        distill.lr_schedule(longer, 2, state)
    with pytest.raises(ValueError, match="^the checkpoint's learning rate has decayed to 0 at step 4: more steps"):
        distill.lr_schedule(longer, 8, {**state, "step": 4})  # a finished run: its rate is 0, and would stay 0


def test_resumed_distillation_lr_is_continuous_and_runs_without_the_launcher(tmp_path, teacher_dir, tokenizer):
    """minimoe-distill run directly (no launcher): 4 steps, then step 2's checkpoint resumed to 6 steps. The rate
    (lr 1e-2, no warmup) is 1, 3/4 of it, then from step 3 on 1/2 x (6 - s) / 4: continuous, where a schedule
    recomputed for 6 steps would jump to 4/6 at step 3."""
    from test_data_loader import write_shards

    write_shards(tmp_path / "shards", [24], fingerprint=tokenizer_fingerprint(tokenizer))
    common = ["--teacher", str(teacher_dir), "--shards", str(tmp_path / "shards"), "--layers", "1", "--hidden", "32",
              "--heads", "2", "--experts", "1", "--relation-heads", "2", "--micro-batch-size", "4",
              "--global-batch-size", "4", "--warmup", "0", "--lr", "1e-2", "--save-every", "2",
              "--deepspeed-config", str(REPO / "ds_configs" / "zero0.json")]
    run = tmp_path / "run"
    first = run_module("pipeline.distill", *common, "--max-steps", "4", "--output", str(run))
    assert first.returncode == 0, first.stderr
    lines = first.stderr.strip().splitlines()
    assert re.fullmatch(r"done: step 4: loss [\d.]+, qq [\d.]+, kk [\d.]+, vv [\d.]+, aux [\d.]+; 16 samples, "
                        r"\d{2,},?\d* tokens seen", lines[-4])
    assert lines[-3:] == [f"curves: {run / 'curves.png'}", f"checkpoint: {run / 'checkpoints' / 'step-00000004'}",
                          f"export: minimoe-export {run} OUT_DIR"]
    # --log-every 10 > 4 steps: the last step is logged all the same, with the mean over the interval
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [4]

    (run / "checkpoints" / "latest").write_text("step-00000002")
    resumed = run_module("pipeline.distill", *common, "--max-steps", "6", "--log-every", "1", "--output", str(run),
                         "--resume")
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4, 5, 6]  # the records after step 2 are the resumed run's
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * f for f in (0.5, 0.375, 0.25, 0.125)])


def test_a_full_disk_while_checkpointing_is_one_line(tmp_path, teacher_dir, tokenizer):
    """A checkpoint write that fails (RLIMIT_FSIZE below the model states' size, as a full disk): one line naming
    the step dir, exit 1, `latest` not moved."""
    import resource

    from test_data_loader import write_shards

    write_shards(tmp_path / "shards", [8], fingerprint=tokenizer_fingerprint(tokenizer))
    run = tmp_path / "run"
    args = ["-m", "pipeline.distill", "--teacher", str(teacher_dir), "--shards", str(tmp_path / "shards"),
            "--layers", "1", "--hidden", "32", "--heads", "2", "--experts", "1", "--relation-heads", "2",
            "--micro-batch-size", "4", "--global-batch-size", "4", "--max-steps", "1", "--output", str(run),
            "--deepspeed-config", str(REPO / "ds_configs" / "zero0.json")]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, resource.RLIM_INFINITY))  # noqa: E731
    full = subprocess.run([sys.executable, *args], cwd=REPO, env={**ENV, "TORCHDYNAMO_DISABLE": "1"},
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)  # (the 4 MB embedding)
    assert full.returncode == 1, full.stderr[-2000:]
    assert re.fullmatch(rf"error: {run / 'checkpoints' / 'step-00000001'}: cannot write the checkpoint: .*; "
                        r"checkpoints/latest names the newest complete checkpoint \(if any\): rerun with --resume "
                        r"once there is room", full.stderr.strip().splitlines()[-1])
    assert not (run / "checkpoints" / "latest").exists()


def test_fingerprint_covers_normalisation(teacher_dir, tokenizer):
    from tokenizers import normalizers

    cased = load_tokenizer(str(teacher_dir))
    cased.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    assert cased.get_vocab() == tokenizer.get_vocab()  # the same vocabulary ...
    assert cased("Paris")["input_ids"] != tokenizer("Paris")["input_ids"]  # ... other ids ...
    assert tokenizer_fingerprint(cased) != tokenizer_fingerprint(tokenizer)  # ... so another fingerprint
    # data prep's no-truncation / no-padding set-up does not change it
    assert tokenizer_fingerprint(open_tokenizer(str(teacher_dir))[0]) == tokenizer_fingerprint(tokenizer)


def build(tmp_path: Path, inputs: list[Path], teacher_dir: Path, *extra: str) -> int:
    return prep.main(["build", "--input", *map(str, inputs), "--output", str(tmp_path / "out"),
                      "--tokenizer", str(teacher_dir), "--workers", "1", *extra])


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_build_that_yields_nothing_exits_2_saying_why(tmp_path, teacher_dir, capsys):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"title": "a"}\n\n{"body": "b"}\nnot json\n')
    assert build(tmp_path, [jsonl], teacher_dir, "--format", "jsonl") == 2
    assert last_error(capsys) == (f"error: {tmp_path / 'out'}: nothing built: no jsonl line is an object with a string "
                                  f"'text' field (3 malformed lines, first: {jsonl}:1, {jsonl}:3, {jsonl}:4)")
    assert not (tmp_path / "out" / "manifest.json").exists()
    shutil.rmtree(tmp_path / "out")
    jsonl.write_text('{"text": "One sentence."}\n{"text": "Another one."}\n')  # forgotten --format jsonl
    assert build(tmp_path, [jsonl], teacher_dir) == 2
    assert last_error(capsys) == (f"error: {tmp_path / 'out'}: nothing built: 0 documents in 1 file(s) (2 stray lines): "
                                  f"is --format wikiextractor right for these files (compressed files must be "
                                  f"decompressed first)?")


def test_a_dangling_symlink_in_an_input_dir_is_an_error(tmp_path, teacher_dir, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "wiki_00").write_text('<doc id="1" title="T">\nT\nOne. Two.\n</doc>\n')
    (tmp_path / "in" / "wiki_01").symlink_to(tmp_path / "gone")
    assert build(tmp_path, [tmp_path / "in"], teacher_dir) == 2
    assert last_error(capsys) == f"error: {tmp_path / 'in' / 'wiki_01'}: dangling symlink (to {tmp_path / 'gone'})"


# --------------------------------------------------------------------------- one-line errors

def test_output_that_is_a_file_or_under_one_is_refused_by_every_command(tmp_path, tiny_student, teacher_dir, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    commands = {
        "prep": lambda out: prep.main(["build", "--input", str(file), "--output", out]),
        "distill": lambda out: distill.main(["--shards", "s", "--output", out]),
        "finetune": lambda out: finetune_main(["--model", "m", "--task", "rte", "--data-dir", "d", "--output", out]),
        "compress": lambda out: compress.main([str(tiny_student), out]),
        "export": lambda out: export.main([str(tmp_path / "no-run"), out]),
    }
    for name, command in commands.items():
        flag = {"compress": "output", "export": "OUT_DIR"}.get(name, "--output")
        assert command(str(file)) == 2, name
        assert last_error(capsys) == f"error: {flag} {file}: is a file", name
        assert command(str(file / "sub")) == 2, name
        assert last_error(capsys) == f"error: {flag} {file / 'sub'}: cannot be created: {file} is a file", name


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_output_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(InputError, match=rf"--output {tmp_path / 'ro' / 'x'}: {tmp_path / 'ro'} is not writable"):
        FinetuneConfig("m", "rte", "d", str(tmp_path / "ro" / "x"))


def truncated_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.bin", "*.h5", "*.onnx", "onnx", "openvino"))
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return target


def test_truncated_or_missing_weights_are_one_line(tmp_path, tiny_student, teacher_dir, capsys):
    student = truncated_copy(tiny_student, tmp_path / "student")
    with pytest.raises(InputError, match=rf"^{student / 'model.safetensors'}: cannot load the model: Error while "
                                         r"deserializing header"):
        build_model(student, get_task("sst2"))
    assert compress.main([str(student), str(tmp_path / "small")]) == 2
    assert last_error(capsys).startswith(f"error: {student / 'model.safetensors'}: cannot load the model: ")
    assert report.main(["compute", str(student), "--json"]) == 2
    assert last_error(capsys).startswith(f"error: {student / 'model.safetensors'}: cannot load the model: ")
    teacher = truncated_copy(teacher_dir, tmp_path / "teacher")
    cfg = distill.DistillConfig(teacher=str(teacher), shards="s")
    with pytest.raises(InputError, match=rf"^{teacher / 'model.safetensors'}: cannot load the model: "):
        distill.load_teacher(cfg, torch.float32)
    (teacher / "model.safetensors").unlink()  # config.json, no weights
    with pytest.raises(InputError, match=rf"^{teacher}: cannot load the model: .*no file named model.safetensors"):
        distill.load_teacher(cfg, torch.float32)


WIKI_DOC = '<doc id="{i}" title="T{i}">\nT{i}\nThe first sentence of {i}. A second one follows. And a third.\n</doc>\n'


def test_broken_shards_and_manifests_are_one_line(tmp_path, teacher_dir, capsys):
    inputs = []
    for index in range(2):
        inputs.append(tmp_path / f"wiki_{index:02d}")
        inputs[-1].write_text("".join(WIKI_DOC.format(i=10 * index + d) for d in range(3)))
    assert build(tmp_path, inputs, teacher_dir) == 0
    out = tmp_path / "out"
    manifest, shard = out / "manifest.json", out / "shard-00001.arrow"
    good = json.loads(manifest.read_text())
    samples = good["shards"][1]["num_samples"]
    edited = json.loads(manifest.read_text())
    edited["totals"]["num_samples"] += 1
    manifest.write_text(json.dumps(edited))
    assert prep.main(["inspect", str(out), "--verify", "--samples", "0"]) == 2  # a hand-edited count
    assert last_error(capsys) == (f"error: {manifest}: totals.num_samples {good['totals']['num_samples'] + 1} is not "
                                  f"the sum over its shards (edited after the build?)")
    edited["totals"]["num_samples"] -= 1
    edited["shards"][1]["num_samples"] += 1
    edited["shards"][0]["num_samples"] -= 1
    manifest.write_text(json.dumps(edited))
    assert prep.main(["inspect", str(out), "--samples", "0"]) == 2
    assert last_error(capsys) == f"error: {out / 'shard-00000.arrow'}: {good['shards'][0]['num_samples']} samples " \
                                 f"but manifest.json says {good['shards'][0]['num_samples'] - 1}"
    manifest.write_text(json.dumps(good))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    assert prep.main(["inspect", str(out), "--samples", "0"]) == 2
    assert last_error(capsys).startswith(f"error: {shard}: cannot read the shard (")
    with pytest.raises(InputError, match=rf"^{shard}: cannot read the shard \("):
        ShardDataset(out)
    shard.unlink()
    with pytest.raises(InputError, match=rf"^{shard}: cannot read the shard \("):
        ShardDataset(out)
    manifest.write_text('{"format": "minimoe-shards", ')
    assert prep.main(["inspect", str(out)]) == 2
    assert last_error(capsys).startswith(f"error: {manifest}: not valid JSON (")
    with pytest.raises(InputError, match=rf"^{manifest}: not valid JSON"):
        ShardDataset(out)
    assert samples > 0


def test_glue_files_without_examples_or_with_bad_bytes_name_the_file(tmp_path):
    header_only = write_tsv(tmp_path / "train.tsv", "sentence\tlabel", [])
    with pytest.raises(DataError, match=rf"^{header_only}: no examples \(task sst2\)$"):
        read_split(get_task("sst2"), header_only)
    bad = tmp_path / "dev.tsv"
    bad.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff byte\t0\n")
    with pytest.raises(DataError, match=rf"^{bad}:3: invalid UTF-8$"):
        read_split(get_task("sst2"), bad)
    bad.write_bytes(b"EU NNP B-NP B-ORG\nr\xe9jects VBZ B-VP O\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: invalid UTF-8$"):
        read_split(get_task("conll2003"), bad)


@pytest.mark.parametrize("flags, message", [
    (["--max-train-examples", "0"], "--max-train-examples must be >= 1 (got 0)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0 (got -0.1)"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0 (0: no clipping) (got -1.0)"),
    (["--lr", "0"], "--lr must be > 0 (got [0.0])"),
])
def test_finetune_flags_are_refused_naming_the_flag(flags, message, capsys):
    assert finetune_main(["--model", "m", "--task", "rte", "--data-dir", "d", "--output", "o", *flags]) == 2
    assert last_error(capsys) == f"error: {message}"


@pytest.mark.parametrize("flags, message", [
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0 (got -0.1)"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0 (0: no clipping) (got -1.0)"),
])
def test_distill_flags_are_refused_naming_the_flag(flags, message, capsys):
    assert distill.main(["--shards", "s", *flags]) == 2
    assert last_error(capsys) == f"error: {message}"


def test_parquet_text_that_is_not_strings_leaves_no_temporary(tmp_path, teacher_dir, capsys):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    assert build(tmp_path, [path], teacher_dir, "--format", "parquet") == 2
    assert last_error(capsys) == f"error: {path}: column 'text' holds int64, not strings"
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_config_file_that_is_not_an_object(tmp_path, capsys):
    file = tmp_path / "run.json"
    file.write_text("[1, 2]")
    assert distill.main(["--config", str(file), "--shards", "s"]) == 2
    assert last_error(capsys) == f"error: {file}: the config must be a JSON object of fields, got list"


def test_max_seq_length_above_the_positions_is_refused_at_start(tmp_path, teacher_dir, tiny_student, capsys):
    text = tmp_path / "wiki_00"
    text.write_text('<doc id="1" title="T">\nT\nOne. Two.\n</doc>\n')
    assert build(tmp_path, [text], teacher_dir, "--max-seq-length", "1024") == 2
    assert last_error(capsys) == (f"error: --max-seq-length 1024: above the 512 positions of the tokenizer's model "
                                  f"({teacher_dir.resolve()})")
    with pytest.raises(InputError, match=rf"^--max-seq-length 600: above the 512 positions of {tiny_student}$"):
        check_max_seq_length(600, tiny_student)
    check_max_seq_length(512, tiny_student)
    roberta = write_config(tmp_path / "roberta", {"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    with pytest.raises(InputError, match="above the 512 positions"):
        check_max_seq_length(513, roberta)
    shards = type("Shards", (), {"manifest": {"max_seq_length": 600}, "manifest_path": tmp_path / "manifest.json"})()
    with pytest.raises(InputError, match=rf"^{tmp_path / 'manifest.json'}: max_seq_length 600: above the 512 "
                                         rf"positions of {teacher_dir}$"):
        distill.check_lengths(shards, str(teacher_dir), 1024)
    shards.manifest["max_seq_length"] = 256
    with pytest.raises(ValueError, match=r"max_seq_length 256: above the student's 128 positions$"):
        distill.check_lengths(shards, str(teacher_dir), 128)


# --------------------------------------------------------------------------- running it as users do

def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in ENV.items() if k != "PYTHON"}
    return subprocess.run(["bash", str(REPO / "launch.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def test_launcher_flags_without_values_ports_and_cores():
    missing = launch("distill", "--num-procs")
    assert (missing.returncode, missing.stderr) == (2, "error: --num-procs needs a value; see ./launch.sh --help\n")
    assert launch("distill", "--num-procs", "--dry-run").returncode == 2
    dry = launch("distill", "--dry-run", "--shards", "s", env={"OMP_NUM_THREADS": "1"})  # nproc alone would say 1
    assert dry.returncode == 0, dry.stderr
    command = dry.stderr.split()  # "+ PYTHON -m deepspeed.launcher.runner ..."
    if (REPO / ".venv" / "bin" / "python").exists():
        assert command[1:4] == [str(REPO / ".venv" / "bin" / "python"), "-m", "deepspeed.launcher.runner"]
    if not shutil.which("nvidia-smi"):
        assert command[command.index("--num_gpus") + 1] == str(len(os.sched_getaffinity(0)))
    ports = {launch("distill", "--dry-run").stderr.split("--master_port ")[1].split()[0] for _ in range(2)}
    assert len(ports) == 2 and "29500" not in ports  # a free port each time
    given = launch("distill", "--dry-run", "--master-port", "1234").stderr
    assert given.count("--master_port") == 1 and "--master_port 1234" in given


def test_launcher_refuses_more_processes_than_gpus_unless_cpu_ranks(tmp_path):
    (tmp_path / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    (tmp_path / "nvidia-smi").chmod(0o755)
    one_gpu = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "DS_ACCELERATOR": ""}  # a fake node with one GPU
    two = launch("distill", "--num-procs", "2", "--dry-run", env=one_gpu)
    assert (two.returncode, two.stderr) == (2, "error: --num-procs 2: this node has 1 GPU(s), one process each; "
                                               "DS_ACCELERATOR=cpu runs CPU ranks instead\n")
    default = launch("distill", "--dry-run", env=one_gpu).stderr.split()
    assert default[default.index("--num_gpus") + 1] == "1"  # one per GPU
    cpu = launch("distill", "--num-procs", "2", "--dry-run", env={**one_gpu, "DS_ACCELERATOR": "cpu"})
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stderr.split()[cpu.stderr.split().index("--num_gpus") + 1] == "2"


def test_grid_keeps_explicit_values():
    grid = FinetuneConfig("m", "rte", "d", "o", grid=True, batch_size=[32])
    assert (grid.lr, grid.batch_size) == ([2e-5, 3e-5], [32])
    assert FinetuneConfig("m", "rte", "d", "o", grid=True, lr=[1e-4]).batch_size == [16, 32]
    assert (FinetuneConfig("m", "rte", "d", "o").lr, FinetuneConfig("m", "rte", "d", "o").batch_size) == ([5e-5], [32])


def test_the_first_cpu_run_says_that_deepspeed_compiles_its_op(tmp_path, monkeypatch, capsys):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from pipeline.optim import init_distributed

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the shared-memory op is DeepSpeed's CPU communication op")
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there yet
    init_distributed()
    assert capsys.readouterr().err == (f"note: DeepSpeed compiles its deepspeed_shm_comm op on this first run (~40 s; "
                                       f"kept in {tmp_path / 'deepspeed_shm_comm'})\n")
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    init_distributed()
    assert capsys.readouterr().err == ""
