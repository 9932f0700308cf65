"""Distillation pipeline: models, objectives, the DeepSpeed engine, export, finetune, report.

Importing the package routes library log lines to stderr (pipeline.logs) and registers the student with
transformers' Auto classes (pipeline.models)."""
from pipeline.logs import route_library_logs

route_library_logs()

from pipeline import models as _models  # noqa: E402, F401
