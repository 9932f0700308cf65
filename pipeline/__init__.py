"""Distillation pipeline: models, objectives, the DeepSpeed engine, export, finetune, report."""
