"""Task heads on the student: sequence classification (pooled [CLS]) and token classification; the loss is
objectives.task_loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from pipeline.models.config import StudentConfig
from pipeline.models.student import Student, StudentPreTrainedModel
from pipeline.objectives import task_loss


@dataclass
class TaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    """Task loss + the student's weighted aux loss (None without labels)."""
    logits: torch.Tensor | None = None
    """(B, num_labels) for sequence heads, (B, T, num_labels) for token heads."""
    aux_loss: torch.Tensor | None = None
    """The student's weighted aux loss (already included in `loss`)."""
    expert_counts: list[torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """With output_hidden_states: the student's, the embeddings' output then each layer's (B, T, H)."""


class _TaskHead(StudentPreTrainedModel):
    """A student encoder with a linear task head of config.num_labels outputs; subclasses say what is pooled;
    the loss is objectives.task_loss."""

    kind: str = ""

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {config.num_labels}")
        self.num_labels, self.ep_size = config.num_labels, ep_size
        self.student = Student(config, deepspeed_moe, ep_size)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool | None = None) -> TaskOutput | tuple:
        out = self.student(input_ids, attention_mask, token_type_ids, qkv_layer=None,
                           output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(self.features(out.last_hidden_state)))
        loss = None if labels is None else task_loss(logits, labels) + out.aux_loss
        result = TaskOutput(loss=loss, logits=logits, aux_loss=out.aux_loss, expert_counts=out.expert_counts,
                            hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()


class StudentForSequenceClassification(_TaskHead):
    """Pooled [CLS] (dense + tanh, as BERT) -> linear; num_labels 1 = regression (MSE), else cross-entropy."""

    kind = "sequence_classification"

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__(config, deepspeed_moe, ep_size)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))  # (B, H) at [CLS]


class StudentForTokenClassification(_TaskHead):
    """Per-token linear head; labels -100 (padding, non-first sub-tokens) are ignored."""

    kind = "token_classification"

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__(config, deepspeed_moe, ep_size)
        self.post_init()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # (B, T, H)
