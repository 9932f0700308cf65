"""Model dirs where they enter a command (finetune --model/--teacher, distill --teacher, compress): their
config.json, the sequence length checked against their positions, and load errors (a truncated
model.safetensors, a config.json without weights) turned into one line naming the file."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from minimoe_common.cli import InputError

WEIGHTS = "model.safetensors"


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The dir's config.json as a dict, or an InputError saying what the dir lacks."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: no config.json (expected an exported student or a Hugging Face model dir)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object")
    return config


def max_positions(config: dict[str, Any]) -> int | None:
    """Tokens the model can attend over: max_position_embeddings, less RoBERTa's offset (its positions start
    after the padding id); None when the config does not say."""
    positions = config.get("max_position_embeddings")
    if positions is None:
        return None
    offset = config.get("pad_token_id", 0) + 1 if config.get("model_type") in ("roberta", "xlm-roberta") else 0
    return positions - offset


def check_max_seq_length(length: int, model_dir: str | Path, flag: str = "--max-seq-length") -> None:
    """Refuse a sequence length the model has no positions for, before any work (not at the first long batch)."""
    positions = max_positions(read_model_config(model_dir))
    if positions is not None and length > positions:
        raise InputError(f"{flag} {length}: above the {positions} positions of {model_dir}")


@contextmanager
def loading(model_dir: str | Path) -> Iterator[None]:
    """Turn the errors of loading a model dir's weights into one InputError naming the file: safetensors'
    error on a truncated file, transformers' OSError on a dir without weights."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as e:
        weights = Path(model_dir) / WEIGHTS
        name = weights if weights.exists() else model_dir
        raise InputError(f"{name}: cannot load the model: {str(e).splitlines()[0]}") from None
