"""Checkpoints of a distillation run: DeepSpeed engine state + trainer state + per-rank RNG states.

Layout (CHECKPOINTS = OUTPUT/checkpoints):
    step-00001000/   DeepSpeed files (mp_rank_00_model_states.pt, layer_*_expert_*_model_states.pt,
                     *_optim_states.pt), trainer_state.json (step, data cursor, layout, configs),
                     rng-rank00000.pt ... (one per rank), tokenizer/ (so the checkpoint exports alone)
                     checksums.json (size and sha256 of every other file, written once all ranks wrote)
    latest           the tag of the newest COMPLETE checkpoint, replaced atomically after every rank wrote

A rank killed mid-save leaves `latest` on the previous checkpoint, and the resumed run writes that step's
directory anew. A checkpoint damaged later (a truncated or overwritten file) fails its checksums on resume,
which then falls back to the newest intact one, saying so.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minimoe_common.files import file_sha256, write_json, write_text
from pipeline.optim import lost_peer

TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG the step uses: torch CPU (dropout, router noise on CPU), the accelerator's, Python's."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device_state = None if accelerator.device_name() == "cpu" else accelerator.get_rng_state()
    return {"torch": torch.get_rng_state(), "accelerator": device_state, "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["torch"])
    if state["accelerator"] is not None:
        get_accelerator().set_rng_state(state["accelerator"])
    random.setstate(state["python"])


def latest_tag(root: Path) -> str | None:
    """The newest complete checkpoint's tag under `root`, or None."""
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    path = Path(step_dir) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {step_dir} is not a complete minimoe checkpoint")
    return json.loads(path.read_text())


def save(engine, root: Path, step: int, trainer_state: dict[str, Any], tokenizer, keep: int) -> Path:
    """Write checkpoint `step` on every rank (collective), then point `latest` at it and keep the newest `keep`."""
    root, tag, rank = Path(root), tag_for(step), dist.get_rank()
    step_dir = root / tag
    if rank == 0 and step_dir.exists():  # an unfinished save of a killed run (`latest` is older): no stale files
        shutil.rmtree(step_dir)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)  # ends with a barrier
        torch.save(rng_state(), step_dir / f"rng-rank{rank:05d}.pt")
        if rank == 0:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(step_dir / "tokenizer"))
            write_text(step_dir / TRAINER_STATE, json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
    except (OSError, RuntimeError) as e:  # a full disk: torch.save raises RuntimeError; `latest` is not moved
        if isinstance(e, RuntimeError) and lost_peer(e):
            raise  # another rank died in the save's collectives: the caller says so
        raise OSError(getattr(e, "errno", None), f"cannot write the checkpoint: {str(e).splitlines()[0]}",
                      str(step_dir)) from None
    dist.barrier()  # every rank's files are on disk: only now is the checkpoint complete
    if rank == 0:
        write_json(step_dir / CHECKSUMS, checksums(step_dir))
        write_text(root / LATEST, tag)
        done = sorted(d for d in root.glob("step-*") if d.name <= tag)
        unfinished = [d for d in root.glob("step-*") if d.name > tag]  # left by a run that died mid-save
        for old in done[:-keep] + unfinished:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return step_dir


def checksums(step_dir: Path) -> dict[str, list]:
    """Every file of a checkpoint (the shared filesystem's view: all ranks' files) -> [bytes, sha256]."""
    files = sorted(p for p in Path(step_dir).rglob("*") if p.is_file() and p.name != CHECKSUMS)
    return {str(p.relative_to(step_dir)): [p.stat().st_size, file_sha256(p)] for p in files}


def damage(step_dir: Path) -> str | None:
    """What is wrong with a checkpoint's files (the first missing, resized or changed one), or None if intact.
    Checkpoints from before checksums have only their trainer state checked."""
    path = Path(step_dir) / CHECKSUMS
    if not path.is_file():
        state = Path(step_dir) / TRAINER_STATE
        return None if state.is_file() else f"{state} is missing"
    found = checksums(step_dir)
    for name, (size, digest) in json.loads(path.read_text()).items():
        if name not in found:
            return f"{Path(step_dir) / name} is missing"
        if found[name] != [size, digest]:
            what = f"{found[name][0]} bytes, {size} written" if found[name][0] != size else "its sha256 changed"
            return f"{Path(step_dir) / name} is damaged ({what})"
    return None


def resume_tag(root: Path) -> str:
    """The checkpoint to resume: `latest` when intact, else the newest intact older one (said in one line on
    stderr), else an error naming the damage."""
    root = Path(root)
    latest = latest_tag(root)
    if latest is None:
        raise FileNotFoundError(f"{root / LATEST}: no such file; nothing to resume (run without --resume)")
    problems = []
    older = sorted((d for d in root.glob("step-*") if d.name < latest), reverse=True)
    for step_dir in [root / latest, *older]:
        problem = damage(step_dir)
        if problem is None:
            if problems and int(os.environ.get("RANK", "0")) == 0:
                print(f"warning: {problems[0]}; resuming from {step_dir.name}, the newest intact checkpoint",
                      file=sys.stderr)
            return step_dir.name
        problems.append(problem)
    raise ValueError(f"{problems[0]}; and no older intact checkpoint under {root} to resume from")


def resume(engine, root: Path, tag: str, layout: dict[str, Any], student: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Load checkpoint `tag` (from `resume_tag`) under `root` into `engine`; -> (trainer state, exact).

    `student`: this run's StudentConfig dict; the checkpoint's must match it up to ep_size.

    Same layout (world size, ep_size, ZeRO stage, precision): the full state and this rank's RNG,
    so training continues exactly. Another layout: weights only (DeepSpeed cannot reshard ZeRO
    optimizer state), exact=False and the optimizer starts afresh."""
    state = read_trainer_state(Path(root) / tag)
    saved = state["student"]  # (a field newer than the checkpoint shows as None -> its value)
    changed = [f"{k} {saved.get(k)!r} -> {student.get(k)!r}" for k in sorted(saved.keys() | student.keys())
               if k != "ep_size" and saved.get(k) != student.get(k)]
    if changed:
        raise ValueError(f"{Path(root) / tag}: this run's student differs from the checkpoint's: {'; '.join(changed)}")
    exact = state["layout"] == layout
    engine.load_checkpoint(str(root), tag=tag, load_module_only=not exact)
    if exact:
        rng_file = Path(root) / tag / f"rng-rank{dist.get_rank():05d}.pt"
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state, exact
