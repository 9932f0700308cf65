"""Distillation pipeline: models, objectives, the DeepSpeed engine, export, finetune, report.

Importing the package registers the student with transformers' Auto classes (pipeline.models)."""
from pipeline import models as _models  # noqa: F401
