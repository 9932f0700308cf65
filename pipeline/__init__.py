"""Distillation pipeline: models, objectives, the DeepSpeed engine, export, finetune, report.

Importing the package registers the student with transformers' Auto classes (pipeline.model)."""
from pipeline import model as _model  # noqa: F401
