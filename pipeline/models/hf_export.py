"""Dense students as plain BERT: a student with one expert, dense attention and full-rank FFNs is a post-LayerNorm
BERT encoder with exact GELU, so it is saved as a standard `bert` checkpoint (BertModel's config and weight names)
that any transformers install loads, and such a dir reads back as a Student.

Our Student has no pooler; BertModel has one (dense + tanh on [CLS], what BertForSequenceClassification
classifies). The export writes it initialised as BERT initialises one (normal(0, initializer_range), zero bias;
seeded, so an export is reproducible): AutoModel loads without a missing-weights warning, and finetuning trains
it as our own StudentForSequenceClassification trains its pooler. It is not distilled: use the hidden states
(or sentence-transformers' pooling), not `pooler_output`, as features. Reading a BERT dir back drops it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel

from minimoe_common.cli import InputError
from pipeline.models.config import STUDENT_MODEL_TYPE, StudentConfig
from pipeline.models.files import loading, read_model_config
from pipeline.models.heads import StudentForSequenceClassification, StudentForTokenClassification
from pipeline.models.student import Student

# Our parameter names -> BertModel's, per prefix ("{n}" = the layer index); the one table, read both ways.
BERT_NAMES = [
    ("embeddings.layer_norm.", "embeddings.LayerNorm."),
    ("layers.{n}.attention.query.", "encoder.layer.{n}.attention.self.query."),
    ("layers.{n}.attention.key.", "encoder.layer.{n}.attention.self.key."),
    ("layers.{n}.attention.value.", "encoder.layer.{n}.attention.self.value."),
    ("layers.{n}.attention.output.", "encoder.layer.{n}.attention.output.dense."),
    ("layers.{n}.attention_norm.", "encoder.layer.{n}.attention.output.LayerNorm."),
    ("layers.{n}.ffn.fc1.", "encoder.layer.{n}.intermediate.dense."),
    ("layers.{n}.ffn.fc2.", "encoder.layer.{n}.output.dense."),
    ("layers.{n}.ffn_norm.", "encoder.layer.{n}.output.LayerNorm."),
    ("embeddings.", "embeddings."),  # word, position and token type embeddings keep their names
]
# StudentConfig fields -> BertConfig's (vocab_size, hidden_size, intermediate_size, max_position_embeddings,
# type_vocab_size, pad_token_id, layer_norm_eps, initializer_range have the same names).
BERT_FIELDS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "dropout": "hidden_dropout_prob",
               **{name: name for name in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings",
                                          "type_vocab_size", "pad_token_id", "layer_norm_eps", "initializer_range")}}
POOLER_SEED = 0


def is_plain_bert(config: StudentConfig) -> bool:
    """One expert, dense attention, full-rank FFNs, every layer of one shape: the student is a BERT encoder."""
    return not config.is_moe and not config.ffn_ranks and not config.is_pruned


def rename(key: str, reverse: bool = False) -> str:
    """A parameter name of ours -> BertModel's (reverse: BertModel's -> ours)."""
    for ours, theirs in BERT_NAMES:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        match = re.match(re.escape(source).replace(r"\{n\}", r"(?P<n>\d+)"), key)
        if match:
            return target.format(n=match.groupdict().get("n")) + key[match.end():]
    raise KeyError(f"{key}: no BERT name for this parameter")


def bert_config(config: StudentConfig) -> BertConfig:
    """The BertConfig of a dense student: exact GELU (our FFN's F.gelu), absolute positions, its dropout on
    attention probabilities and residual branches alike."""
    return BertConfig(**{theirs: getattr(config, ours) for ours, theirs in BERT_FIELDS.items()}, hidden_act="gelu",
                      attention_probs_dropout_prob=config.dropout, architectures=["BertModel"])


def save_as_bert(student: Student, directory: str | os.PathLike) -> None:
    """Write `student` (dense) as a `bert` model dir: config.json + model.safetensors of BertModel."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(POOLER_SEED)
        bert = BertModel(bert_config(student.config))  # the pooler: BERT's initialisation
    weights = {rename(key): value for key, value in student.state_dict().items()}
    missing, unexpected = bert.load_state_dict(weights, strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise ValueError(f"the student's weights do not map onto BertModel: missing {missing[:4]}, unexpected {unexpected[:4]}")
    bert.save_pretrained(directory)


def student_config_of_bert(config: BertConfig, directory: str | os.PathLike, **extra: Any) -> StudentConfig:
    """The StudentConfig of a BERT dir's encoder (exact GELU; [CLS]/[SEP] ids from the dir's tokenizer), `extra`
    fields (e.g. num_labels) added."""
    from minimoe_common.tokenizer import load_tokenizer

    if config.hidden_act != "gelu":
        raise InputError(f"{Path(directory) / 'config.json'}: hidden_act {config.hidden_act!r}; a student uses "
                         f"exact GELU ('gelu')")
    tokenizer = load_tokenizer(str(directory))
    return StudentConfig(**{ours: getattr(config, theirs) for ours, theirs in BERT_FIELDS.items()},
                         cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, **extra)


def load_student(directory: str | os.PathLike) -> Student:
    """An exported student dir as a Student: our format, or a dense student written as BERT (any BERT with exact
    GELU; a finetuned dir's encoder; the pooler is dropped, [CLS]/[SEP] ids come from the dir's tokenizer)."""
    model_type = student_or_bert(directory, f"a student dir ({STUDENT_MODEL_TYPE!r}) or a dense student exported as 'bert'")
    with loading(directory):
        if model_type == STUDENT_MODEL_TYPE:
            return Student.from_pretrained(directory)
        bert = BertModel.from_pretrained(directory)
    student = Student(student_config_of_bert(bert.config, directory))
    student.load_state_dict({rename(key, reverse=True): value for key, value in bert.state_dict().items()
                             if not key.startswith("pooler.")})
    return student


def load_student_head(directory: str | os.PathLike, token: bool) -> StudentForSequenceClassification | StudentForTokenClassification:
    """A finetuned dir (BertFor{Sequence,Token}Classification, or a student's head) as the student's task head of
    the same weights: BERT's encoder renamed (BERT_NAMES), its pooler and classifier kept."""
    from transformers import BertForSequenceClassification, BertForTokenClassification

    head = StudentForTokenClassification if token else StudentForSequenceClassification
    model_type = student_or_bert(directory, "a finetuned BERT or student dir")
    with loading(directory):
        if model_type == STUDENT_MODEL_TYPE:
            return head.from_pretrained(directory)
        bert = (BertForTokenClassification if token else BertForSequenceClassification).from_pretrained(directory)
    model = head(student_config_of_bert(bert.config, directory, num_labels=bert.config.num_labels))
    model.load_state_dict({head_key(key): value for key, value in bert.state_dict().items()})
    return model


def head_key(key: str) -> str:
    """A BertFor*Classification parameter name -> our head's: bert.pooler.dense. -> pooler., bert.X -> student.X
    renamed, classifier. as it is."""
    if key.startswith("bert.pooler.dense."):
        return "pooler." + key.removeprefix("bert.pooler.dense.")
    return "student." + rename(key.removeprefix("bert."), reverse=True) if key.startswith("bert.") else key


def student_or_bert(directory: str | os.PathLike, expected: str) -> str:
    """The dir's model_type, which must be ours or 'bert' (InputError naming `expected` otherwise)."""
    model_type = read_model_config(directory).get("model_type")
    if model_type not in (STUDENT_MODEL_TYPE, "bert"):
        raise InputError(f"{Path(directory) / 'config.json'}: model_type {model_type!r}; expected {expected}")
    return model_type
