"""Finetune a model dir on a GLUE task or CoNLL-2003 NER through the DeepSpeed engine.

    python -m pipeline.finetune --model DIR --task rte --data-dir ../shared/data/glue --output out/rte
    # the authors' RTE recipe: 156 steps per epoch, dev every 10 steps, stop 5 epochs (78 evaluations) after the best
    python -m pipeline.finetune --model DIR --task rte ... --lr 3e-5 --batch-size 16 --epochs 10 --eval-every 10 --patience 78
    python -m pipeline.finetune suite --model DIR [DIR ...] --data-dir ../shared/data --output out/suite
    # PKD (Sun et al. 2019) from a teacher finetuned on the task; alpha 0.7 and T 10 by default then (the authors')
    python -m pipeline.finetune --model DIR --task rte ... --teacher TEACHER --pkd-beta 500 --pkd-strategy skip
    # MoEBERT (Zuo et al. 2022): a student from minimoe-moebert, every hidden state and the predictions distilled
    python -m pipeline.finetune --model MOE_DIR --task rte ... --teacher TEACHER --moebert-distill 5 --warmup 0 --weight-decay 0
    ./launch.sh finetune --num-procs 2 [suite] ...   # data parallel: N processes through the deepspeed launcher

The model dir is an exported student (config.json "model_type": "minimoe-student") or any Hugging Face
encoder dir (BERT, RoBERTa, MPNet, ...; the packaged teacher is the reference row). Both go through one
loop: the task loss (pipeline.objectives.task_loss) on the logits, plus the student's MoE aux loss (0 for
dense and HF models), plus the task-specific KD term of the paper's KD rows when --teacher is given, and
with --pkd-beta PKD's patient loss on the [CLS] states of mapped layers (its PKD row; tensorboard train/patient_loss),
or with --moebert-distill MoEBERT's task loss + weight x (hidden-state MSE of every layer + symmetric KL).
Dev is scored every --eval-every steps (default: each epoch) and after the last step; model/ keeps the
weights of the best evaluation by the task's paper metric, and --patience stops a run early.
Each run writes results.json (best step and score, every evaluation), model/ and TensorBoard logs in
tensorboard/. Under the launcher every process trains on its slice of each batch and scores the whole dev
set (the weights are equal on all ranks, so all ranks agree on the best evaluation); rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import json
import sys

from minimoe_common.cli import add_config_arguments, command, config_from_args
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.run import is_main_process
from pipeline.finetune.suite import finetune, suite
from pipeline.tasks import TASKS, get_task


def build_parser(suite_command: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimoe-finetune" + (" suite" if suite_command else ""),
        description=("Finetune one or more models on every task whose data is under --data-dir and write "
                     "results.md in the paper's column order." if suite_command else __doc__.split("\n\n")[0]))
    add_config_arguments(parser, FinetuneConfig, config_file=True, exclude=("model", "task") if suite_command else ())
    if suite_command:
        parser.add_argument("--model", nargs="+", required=True, help="model dirs, one table row each: DIR or NAME=DIR")
        parser.add_argument("--tasks", nargs="+", default=None, help=f"tasks to run (default: all present of {', '.join(TASKS)})")
    return parser


@command
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's, put before `suite`
    suite_command = bool(argv) and argv[0] == "suite"
    args = build_parser(suite_command).parse_args(argv[1:] if suite_command else argv)
    if suite_command:
        models, tasks = args.model, args.tasks
        del args.model, args.tasks
        table = suite(config_from_args(FinetuneConfig, args, model="", task=""), models, tasks)
        if is_main_process():
            print(table)
    else:
        get_task(args.task)
        results = finetune(config_from_args(FinetuneConfig, args))
        if is_main_process():
            print(json.dumps({key: results[key] for key in ("task", "metrics", "majority_baseline", "model_dir")},
                             indent=2))
