"""The finetuning stage (`minimoe-finetune`, `python -m pipeline.finetune`; usage in pipeline.finetune.cli).

config: FinetuneConfig and the DeepSpeed config; data: encoding and batches; scoring: predictions and
metrics; run: one training run with step-level dev selection and early stopping; suite: grids, suites and
the paper's results table.
"""
from pipeline.finetune.cli import main

__all__ = ["main"]
