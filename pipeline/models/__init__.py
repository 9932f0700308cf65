"""MiniLM / MiniMoE students (a BERT-style encoder whose FFNs are dense or mixtures of experts) and teachers.

    config    StudentConfig (a transformers PreTrainedConfig, model_type "minimoe-student"), size presets
    layers    embeddings, attention, FFN, low-rank Linear
    moe       routers (learned, hash), sorted dispatch, torch and DeepSpeed MoE FFNs, attention experts, moefy init
    student   Student (a transformers PreTrainedModel)
    heads     StudentForSequenceClassification, StudentForTokenClassification
    teacher   any Hugging Face encoder (or a student) as a frozen teacher exposing one layer's Q/K/V
    files     model dirs where they enter a command (config, positions, load errors)
    hf_export dense students as plain BERT checkpoints (minimoe-export) and back (load_student)

save_pretrained / from_pretrained are transformers' own (config.json + model.safetensors). MoE blocks are plain
torch (TorchMoE, for one process: a loaded model needs no DeepSpeed) or, built with `deepspeed_moe=True` for
training in the engine, DeepSpeed's classic MoE layer; both route with the same Router and share one state dict.
Expert parallelism is a launch setting: `Student(config, deepspeed_moe=True, ep_size=N)`, then
`deepspeed.initialize` creates the expert-parallel groups. Importing this package registers the student with
AutoConfig, AutoModel and AutoModelFor{Sequence,Token}Classification.
"""
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

from pipeline.models.config import (ROUTER_NOISE, STUDENT_MODEL_TYPE, STUDENT_PRESETS, StudentConfig, is_student_dir,
                                    student_fields)
from pipeline.models.heads import StudentForSequenceClassification, StudentForTokenClassification, TaskOutput
from pipeline.models.layers import LowRankLinear
from pipeline.models.moe import EXPERT_KEY
from pipeline.models.student import (TINYBERT_PROJECTION, TRAINING_ONLY_PREFIXES, Student, StudentOutput,
                                     StudentPreTrainedModel)

__all__ = ["EXPERT_KEY", "ROUTER_NOISE", "STUDENT_MODEL_TYPE", "STUDENT_PRESETS", "LowRankLinear", "Student",
           "StudentConfig", "StudentForSequenceClassification", "StudentForTokenClassification", "StudentOutput",
           "StudentPreTrainedModel", "TINYBERT_PROJECTION", "TRAINING_ONLY_PREFIXES", "TaskOutput", "is_student_dir", "student_fields"]

AutoConfig.register(STUDENT_MODEL_TYPE, StudentConfig)
AutoModel.register(StudentConfig, Student)
AutoModelForSequenceClassification.register(StudentConfig, StudentForSequenceClassification)
AutoModelForTokenClassification.register(StudentConfig, StudentForTokenClassification)
