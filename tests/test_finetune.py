"""Finetune stage: encoding, losses, the results table and GLUE score, CLI errors, the selection protocol
(dev every N steps, the best evaluation kept, patience, grid and clipping defaults), and real finetunes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launcher import free_port, launch

from minimoe_common.cli import config_from_args
from minimoe_common.tokenizer import load_tokenizer
from pipeline.finetune import main
from pipeline.finetune import run as finetune_run
from pipeline.finetune.cli import build_parser
from pipeline.finetune.config import FinetuneConfig, deepspeed_config
from pipeline.finetune.data import collate, encode
from pipeline.finetune.run import kd_loss
from pipeline.finetune.scoring import evaluate
from pipeline.finetune.suite import glue_score, model_scale, results_table
from pipeline.models import Student, StudentConfig, StudentForSequenceClassification
from pipeline.objectives import task_loss
from pipeline.tasks import Example, TaggedSentence, get_task, read_split

REPO = Path(__file__).resolve().parents[1]
SST2_SLICE = REPO / "examples" / "data" / "SST-2"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # One OpenMP thread: on a shared 2-core machine spinning OpenMP threads made steps ~15x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.finetune", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return load_tokenizer(str(teacher_dir))


def test_conll_labels_first_sub_token_only(tokenizer):
    task = get_task("conll2003")
    words = ["Hirschsprung", "visited", "Tbilisi-Kutaisi", "."]
    labels = [task.labels.index(t) for t in ("B-PER", "O", "B-LOC", "O")]
    [feature] = encode(task, [TaggedSentence(words, labels)], tokenizer, max_length=128)
    pieces = [len(tokenizer.tokenize(w)) for w in words]
    assert pieces[0] > 1 and pieces[2] > 1  # the case under test: words split into several pieces
    expected = [-100]  # [CLS]
    for label, count in zip(labels, pieces):
        expected += [label] + [-100] * (count - 1)
    assert feature["labels"] == expected + [-100]  # [SEP]
    assert feature["words"] == [0, 1, 2, 3]
    # truncation: words that lose their first sub-token are reported as unlabelled, not dropped silently
    [short] = encode(task, [TaggedSentence(words, labels)], tokenizer, max_length=1 + pieces[0] + 1 + 1)
    assert short["words"] == [0, 1]


def test_pairs_and_padding(tokenizer):
    task = get_task("rte")
    features = encode(task, [Example("a cat sat", "a dog", 1), Example("yes", "no", 0)], tokenizer, 128)
    batch = collate(features, tokenizer.pad_token_id)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert batch["input_ids"][0].tolist() == [cls, *tokenizer.convert_tokens_to_ids(["a", "cat", "sat"]), sep,
                                              *tokenizer.convert_tokens_to_ids(["a", "dog"]), sep]
    assert batch["token_type_ids"][0].tolist() == [0] * 5 + [1] * 3
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 3
    assert batch["input_ids"][1, 5:].tolist() == [tokenizer.pad_token_id] * 3
    assert batch["labels"].tolist() == [1, 0]


def test_losses():
    torch.manual_seed(0)
    rte, stsb, conll = get_task("rte"), get_task("stsb"), get_task("conll2003")
    student, teacher, labels = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    assert kd_loss(rte, student, teacher, labels, alpha=0.0, temperature=2.0) == pytest.approx(F.cross_entropy(student, labels).item())
    assert kd_loss(rte, student, student.clone(), labels, alpha=1.0, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    soft = (F.softmax(teacher / 2, -1) * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))).sum(-1).mean() * 4
    assert kd_loss(rte, student, teacher, labels, alpha=1.0, temperature=2.0).item() == pytest.approx(soft.item(), rel=1e-5)
    scores = torch.tensor([0.5, 4.0, 2.5, 1.0])
    prediction, teacher_prediction = torch.randn(4, 1), torch.randn(4, 1)
    assert task_loss(prediction, scores).item() == pytest.approx(((prediction.squeeze(-1) - scores) ** 2).mean().item())
    assert kd_loss(stsb, prediction, teacher_prediction, scores, 1.0, 1.0).item() == pytest.approx(
        ((prediction - teacher_prediction) ** 2).mean().item())
    # token tasks: positions labelled -100 (padding, non-first sub-tokens) do not count
    logits, tags = torch.randn(2, 3, 9), torch.tensor([[1, -100, 0], [2, 0, -100]])
    changed = logits.clone()
    changed[tags == -100] += 5.0
    for loss in (lambda x: task_loss(x, tags), lambda x: kd_loss(conll, x, logits, tags, 0.5, 1.0)):
        assert loss(changed).item() == pytest.approx(loss(logits).item(), rel=1e-6)


def test_results_table_and_glue_score():
    numbers = {"sst2": 90.0, "mrpc": 88.0, "stsb": 86.0, "qqp": 70.0, "mnli-m": 80.0, "mnli-mm": 81.0,
               "qnli": 85.0, "rte": 60.0, "conll2003": 91.25, "cola": 40.0}
    assert glue_score(numbers)[0] == pytest.approx((90 + 88 + 86 + 70 + 80 + 81 + 85 + 60) / 8)  # 80.0; CoLA excluded
    partial = {"sst2": 90.0, "mrpc": 88.0, "stsb": 86.0, "rte": 60.0, "cola": 40.0}
    assert glue_score(partial) == (pytest.approx(81.0), ["sst2", "mrpc", "stsb", "rte"])
    scales = {"teacher": {"params": 109_482_240, "gflops": 10.887}, "MiniMoE": {"params": None, "gflops": None}}
    table = results_table({"teacher": numbers, "MiniMoE": partial}, scales).splitlines()
    assert table[0] == ("| Model | Params | GFLOPs | SST-2 Acc | MRPC F1 | STS-B SpCorr | QQP F1 | MNLI-m/mm Acc "
                        "| QNLI Acc | RTE Acc | GLUE Score | CoNLL F1 | CoLA Mcc |")
    assert table[2] == ("| teacher | 109.5M | 10.89 | 90.0 | 88.0 | 86.0 | 70.0 | 80.0/81.0 | 85.0 | 60.0 | 80.0 "
                        "| 91.2 | 40.0 |")
    assert table[3] == "| MiniMoE | - | - | 90.0 | 88.0 | 86.0 | - | - | - | 60.0 | 81.0 | - | 40.0 |"
    assert "- teacher: GLUE score = mean of 8 of 8 (sst2, mrpc, stsb, qqp, mnli-m, mnli-mm, qnli, rte)" in table
    assert "- MiniMoE: GLUE score = mean of 4 of 8 (sst2, mrpc, stsb, rte); missing: qqp, mnli-m, mnli-mm, qnli" in table


def test_model_scale_of_the_packaged_teacher(teacher_dir):
    """all-MiniLM-L6-v2, BERT 6L;384H, FFN 1536, vocab 30522, 512 positions, with its pooler: embeddings
    30522*384 + 512*384 + 2*384 + 2*384 = 11,918,592; a layer 4*(384*384 + 384) + 2*384*1536 + 1536 + 384 +
    2*2*384 = 1,774,464; the pooler 384*384 + 384 = 147,840. GFLOPs: 6 layers x 128 tokens."""
    assert model_scale(str(teacher_dir)) == {"params": 11_918_592 + 6 * 1_774_464 + 147_840,
                                             "gflops": round(6 * 1_774_464 * 128 / 1e9, 4)}


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tokenizer):
    """A random-init 2-layer MiniMoE student (4 experts) with the real teacher's tokenizer."""
    path = tmp_path_factory.mktemp("tiny_moe")
    torch.manual_seed(0)
    config = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=len(tokenizer), num_experts=4)
    Student(config, deepspeed_moe=True).save_pretrained(path)  # the training path's random init
    tokenizer.save_pretrained(str(path))
    return path


def test_cli_errors(tmp_path, tiny_moe_dir, capsys):
    common = ["--model", str(tiny_moe_dir), "--output", str(tmp_path / "out")]
    assert main([*common, "--task", "sst3", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown task 'sst3'")
    assert main([*common, "--task", "rte", "--data-dir", str(tmp_path)]) == 2
    assert f"error: {tmp_path}: no RTE files" in capsys.readouterr().err
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t2\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    assert main([*common, "--task", "SST-2", "--data-dir", str(tmp_path)]) == 2
    assert f"error: {tmp_path / 'train.tsv'}:3: label '2' is not one of task sst2's labels" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_tiny_moe_student_beats_majority_on_sst2_slice(tmp_path, tiny_moe_dir):
    """Random-init tiny MiniMoE, the real engine, the bundled SST-2 slice (3000 train rows, full dev).
    (A random-init student is enough here: SST-2's word-level sentiment is learnt in two epochs.)"""
    # through `suite`: the bundled data dir holds only SST-2, so the table has one number
    run = run_cli("suite", "--model", f"tiny={tiny_moe_dir}", "--data-dir", str(SST2_SLICE.parent),
                  "--output", str(tmp_path), "--lr", "2e-3", "--epochs", "2", "--max-seq-length", "64")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "tiny" / "sst2"
    results = json.loads((out / "results.json").read_text())
    acc = f"{results['metrics']['sst2']['acc']:.1f}"
    assert re.search(rf"^\| tiny \| \d+\.\dM \| \d+\.\d\d \| {acc} \| - \| - \| - \| - \| - \| - \| {acc} \| - \| - \|$",
                     (tmp_path / "results.md").read_text(), re.M)
    assert json.loads((tmp_path / "results.json").read_text())["tiny"]["glue_score"] == results["metrics"]["sst2"]["acc"]
    majority = 444 / 872  # SOURCES.md: SST-2 dev has 428 negatives, 444 positives
    assert results["majority_baseline"]["sst2"]["acc"] == pytest.approx(100 * majority)
    assert results["metrics"]["sst2"]["acc"] > 100 * majority + 8
    assert [h["step"] for h in results["history"]] == [94, 188]  # ceil(3000 / 32) steps per epoch
    assert saved_model_sst2_accuracy(out / "model") == pytest.approx(results["metrics"]["sst2"]["acc"])
    assert {oct(f.stat().st_mode & 0o777) for f in (out / "model").iterdir()} == {"0o644"}  # readable by others
    tags = _tensorboard_tags(out / "tensorboard")
    assert {"train/loss", "train/aux_loss", "train/lr", "dev/sst2/acc"} <= tags


@pytest.mark.multiproc
def test_two_process_finetune_through_the_launcher(tmp_path, tiny_moe_dir):
    """./launch.sh finetune: 2 data-parallel ranks split each epoch, agree on the best epoch, and rank 0
    alone writes the files (the table is printed once)."""
    run = launch("finetune", ["suite", "--model", f"tiny={tiny_moe_dir}", "--data-dir", str(SST2_SLICE.parent),
                              "--output", str(tmp_path), "--lr", "2e-3", "--epochs", "2", "--batch-size", "16",
                              "--max-train-examples", "640", "--max-seq-length", "64"])
    assert run.returncode == 0, run.stdout[-3000:]
    results = json.loads((tmp_path / "tiny" / "sst2" / "results.json").read_text())
    assert results["world_size"] == 2 and results["train_examples"] == 640
    assert [h["step"] for h in results["history"]] == [20, 40]  # 640 / (2 ranks x 16) steps per epoch
    assert run.stdout.count("| tiny |") == 1
    assert saved_model_sst2_accuracy(tmp_path / "tiny" / "sst2" / "model") == pytest.approx(results["metrics"]["sst2"]["acc"])


def saved_model_sst2_accuracy(model_dir: Path, dev_file: Path = SST2_SLICE / "dev.tsv") -> float:
    """Dev accuracy (%) of a saved SST-2 model, scored here in one plain process."""
    task = get_task("sst2")
    model = StudentForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(str(model_dir))
    batch = collate(encode(task, read_split(task, dev_file), tokenizer, 64), tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        return 100 * (model(**batch).logits.argmax(-1) == labels).float().mean().item()


def _tensorboard_tags(path: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return set(EventAccumulator(str(path)).Reload().Tags()["scalars"])


@pytest.mark.slow
def test_packaged_teacher_beats_majority_and_teaches_a_kd_student(tmp_path, teacher_dir, tiny_moe_dir):
    """The reference row's model (the real teacher) finetuned on the bundled SST-2 slice, then used as the
    task-specific KD teacher of the tiny MiniMoE (the paper's KD rows)."""
    majority = 100 * 444 / 872
    teacher_out, student_out = tmp_path / "teacher", tmp_path / "kd"
    run = run_cli("--model", str(teacher_dir), "--task", "sst2", "--data-dir", str(SST2_SLICE.parent),
                  "--output", str(teacher_out), "--lr", "1e-4", "--epochs", "1", "--max-train-examples", "2000")
    assert run.returncode == 0, run.stderr[-3000:]
    teacher = json.loads((teacher_out / "results.json").read_text())
    assert teacher["metrics"]["sst2"]["acc"] > majority + 10
    run = run_cli("--model", str(tiny_moe_dir), "--task", "sst2", "--data-dir", str(SST2_SLICE.parent),
                  "--output", str(student_out), "--lr", "2e-3", "--epochs", "2", "--max-seq-length", "64",
                  "--teacher", str(teacher_out / "model"), "--kd-alpha", "0.5", "--temperature", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    student = json.loads((student_out / "results.json").read_text())
    assert student["teacher"] == str(teacher_out / "model")
    assert student["metrics"]["sst2"]["acc"] > majority + 8


@pytest.mark.slow
def test_conll_finetune_scores_words_as_seqeval(tmp_path, shared_data, tiny_moe_dir):
    """CoNLL-2003 end to end on real sentences: results.json's entity F1 equals seqeval's on the saved
    model's word-level predictions, rebuilt here from per-word tokenization."""
    import seqeval.metrics

    from pipeline.models import StudentForTokenClassification

    data = tmp_path / "conll2003"
    data.mkdir()
    for name, sentences in (("train.txt", 600), ("valid.txt", 200)):
        blocks = (shared_data / "conll2003" / name).read_text().split("\n\n")[: sentences + 1]
        (data / name).write_text("\n\n".join(blocks) + "\n")
    out = tmp_path / "out"
    run = run_cli("--model", str(tiny_moe_dir), "--task", "conll2003", "--data-dir", str(data), "--output", str(out),
                  "--lr", "2e-3", "--epochs", "3", "--max-seq-length", "128")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["unlabelled_words"] == 0
    task = get_task("conll2003")
    model = StudentForTokenClassification.from_pretrained(out / "model").eval()
    tokenizer = load_tokenizer(str(out / "model"))
    gold, predicted = [], []
    for sentence in read_split(task, data / "valid.txt"):
        pieces = [tokenizer.tokenize(word) for word in sentence.words]
        ids = [tokenizer.cls_token_id] + tokenizer.convert_tokens_to_ids([p for ps in pieces for p in ps]) + [tokenizer.sep_token_id]
        firsts = [1 + sum(len(ps) for ps in pieces[:i]) for i in range(len(pieces))]
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits[0]
        predicted.append([task.labels[int(logits[i].argmax())] for i in firsts])
        gold.append([task.labels[i] for i in sentence.labels])
    assert results["metrics"]["conll2003"]["entity_f1"] == pytest.approx(100 * seqeval.metrics.f1_score(gold, predicted))


def test_flags_config_file_and_help_texts(tmp_path):
    from minimoe_common.cli import field_docs
    from pipeline.finetune.config import GRID_BATCH_SIZE, GRID_LR
    from pipeline.tasks import TASKS

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"lr": [1e-4, 3e-4], "epochs": 2, "max_train_examples": 20000}))
    common = ["--config", str(recipe), "--data-dir", "D", "--output", "O", "--epochs", "1"]
    config = config_from_args(FinetuneConfig, build_parser(False).parse_args(["--model", "M", "--task", "rte", *common]))
    assert (config.lr, config.epochs, config.max_train_examples, config.batch_size) == ([1e-4, 3e-4], 1, 20000, [32])
    args = build_parser(True).parse_args(["--model", "a=A", "b=B", *common])  # suite: --model lists the rows
    assert args.model == ["a=A", "b=B"]
    recipe.write_text(json.dumps({"learning_rate": 1e-4}))
    with pytest.raises(ValueError, match=rf"{recipe}: unknown field 'learning_rate'"):
        config_from_args(FinetuneConfig, build_parser(False).parse_args(["--model", "M", "--task", "rte", *common]))
    # the help texts name what the code uses
    docs = field_docs(FinetuneConfig)
    assert all(name in docs["task"] for name in TASKS)
    lrs, batches = re.search(r"lr ([^x]+) x batch ([^x]+) x", docs["grid"]).groups()
    assert [float(v) for v in lrs.split(",")] == list(GRID_LR)
    assert [int(v) for v in batches.split(",")] == list(GRID_BATCH_SIZE)


def test_deepspeed_config_refuses_owned_keys_and_zero3(tmp_path):
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match=r"'optimizer' is set by minimoe-finetune \(--lr / --weight-decay\)"):
        deepspeed_config(str(owned), batch_size=8, max_grad_norm=5.0)
    owned.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(ValueError, match=r"'gradient_clipping' is set by minimoe-finetune \(--max-grad-norm\)"):
        deepspeed_config(str(owned), batch_size=8, max_grad_norm=5.0)
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        deepspeed_config(str(zero3), batch_size=8, max_grad_norm=5.0)
    shipped = deepspeed_config(str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"), batch_size=8, max_grad_norm=5.0)
    assert shipped["zero_optimization"]["stage"] == 2 and shipped["train_micro_batch_size_per_gpu"] == 8


def test_grid_and_clipping_defaults_are_the_authors():
    """The authors' finetuning scripts: lr 3e-5 with batch 16 (StarK RTE, MiniDisc MRPC), lr 2e-5 with batch 32
    (MiniDisc QQP and CoNLL), clipping 5 in all of them."""
    args = build_parser(False).parse_args(["--model", "M", "--task", "rte", "--data-dir", "D", "--output", "O", "--grid"])
    config = config_from_args(FinetuneConfig, args)
    assert (config.lr, config.batch_size, config.max_grad_norm) == ([2e-5, 3e-5], [16, 32], 5.0)
    assert deepspeed_config(None, 16, config.max_grad_norm)["gradient_clipping"] == 5.0
    with pytest.raises(ValueError, match=r"--patience must be >= 0 \(0: never stop early\) \(got -1\)"):
        FinetuneConfig("M", "rte", "D", "O", patience=-1)


@pytest.fixture(scope="module")
def drifting_sst2(tmp_path_factory, tokenizer) -> Path:
    """An SST-2-format task whose dev accuracy rises, then falls. The rule "good W" -> 1, "bad W" -> 0 is
    learnt first (400 train sentences); the 20 dev sentences follow it too, but train also holds each of
    them twice with the opposite label, and memorising those exceptions later drives dev accuracy down."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [word for word, index in vocabulary if index > 2000 and word.isalpha() and len(word) >= 4]
    fillers, dev_words = words[:400], words[1000:1020]
    rule = [(f"good {w}", 1) for w in fillers[:200]] + [(f"bad {w}", 0) for w in fillers[200:]]
    dev = [(f"good {w}", 1) for w in dev_words[:10]] + [(f"bad {w}", 0) for w in dev_words[10:]]
    folder = tmp_path_factory.mktemp("drifting_sst2")
    for name, rows in (("train.tsv", rule + [(s, 1 - label) for s, label in dev] * 2), ("dev.tsv", dev)):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows))
    return folder


@pytest.fixture(scope="module")
def one_process_group():
    """main() runs in this process as rank 0 of one gloo group, kept for the module: DeepSpeed's MoE layers
    remember their expert groups from one engine to the next. One thread, as run_cli's processes."""
    import torch.distributed as dist

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            env.setenv(key, value)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()
    # DeepSpeed caches its world and expert groups per process: forget those of the destroyed group, or the
    # next module's engines would use them ("Group ... is not registered").
    from deepspeed.utils import groups

    for name, value in vars(groups).items():
        if name.isupper() and name.startswith("_") and isinstance(value, dict):
            value.clear()
    groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = groups._MODEL_PARALLEL_GROUP = None
    torch.set_num_threads(threads)


def drifting_run(model_dir: Path, data_dir: Path, output: Path, *flags: str) -> dict:
    """minimoe-finetune (in this process) of `model_dir` on `data_dir` at lr 2e-3, batch 16; its results.json."""
    assert main(["--model", str(model_dir), "--task", "sst2", "--data-dir", str(data_dir), "--output", str(output),
                 "--lr", "2e-3", "--batch-size", "16", "--max-seq-length", "16", *flags]) == 0
    return json.loads((output / "results.json").read_text())


def test_dev_scored_every_n_steps_and_the_best_evaluation_kept(tmp_path, tiny_moe_dir, drifting_sst2,
                                                              one_process_group, monkeypatch):
    engines = []
    build_engine = finetune_run.build_engine
    monkeypatch.setattr(finetune_run, "build_engine", lambda *a, **k: engines.append(build_engine(*a, **k)) or engines[-1])
    results = drifting_run(tiny_moe_dir, drifting_sst2, tmp_path, "--epochs", "6", "--eval-every", "10")
    steps, scores = [h["step"] for h in results["history"]], [h["score"] for h in results["history"]]
    assert steps == [*range(10, 161, 10), 168]  # ceil(440 / 16) = 28 steps x 6 epochs: every 10th, and the last
    best = max(scores)
    assert scores[0] < best and scores[-1] < best - 25  # the case under test: dev rises, then falls
    assert results["best_step"] == steps[scores.index(best)]  # the first evaluation reaching the best score
    assert results["score"] == results["metrics"]["sst2"]["acc"] == best
    assert saved_model_sst2_accuracy(tmp_path / "model", drifting_sst2 / "dev.tsv") == pytest.approx(best)
    assert engines[0].gradient_clipping() == 5.0  # the authors' clipping reaches the engine by default


def test_patience_stops_after_that_many_evaluations_without_a_higher_score(tmp_path, tiny_moe_dir, drifting_sst2,
                                                                         one_process_group, monkeypatch):
    """Scripted dev scores (the real evaluation's, score replaced) 50, 60, 55, 60, 58, 70 at every 3rd step
    with patience 3: the best is 60 at step 6 (the tie at step 12 is no improvement), and step 15 is the third
    evaluation since, so the run stops there, keeping step 6's weights."""
    scripted, weights = iter([50.0, 60.0, 55.0, 60.0, 58.0, 70.0]), {}

    def scripted_evaluate(model, task, data, batch_size, pad_id, step):
        weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {**evaluate(model, task, data, batch_size, pad_id, step), "score": next(scripted)}

    monkeypatch.setattr(finetune_run, "evaluate", scripted_evaluate)
    results = drifting_run(tiny_moe_dir, drifting_sst2, tmp_path, "--epochs", "1", "--eval-every", "3", "--patience", "3")
    assert [h["step"] for h in results["history"]] == [3, 6, 9, 12, 15]
    assert (results["steps_trained"], results["steps"], results["stopped_early"]) == (15, 28, True)
    assert (results["best_step"], results["score"]) == (6, 60.0)
    saved = StudentForSequenceClassification.from_pretrained(tmp_path / "model").state_dict()
    assert saved.keys() == weights[6].keys()
    assert all(torch.equal(saved[k], weights[6][k]) for k in saved)
    assert not all(torch.equal(saved[k], weights[15][k]) for k in saved)
