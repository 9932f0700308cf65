"""minimoe-export CHECKPOINT OUT_DIR: a distillation checkpoint -> a model dir for users.

Formats: a dense student (one expert, dense attention, full-rank FFNs) is written as a standard `bert` checkpoint
(pipeline.models.hf_export: BertModel's config and weight names, a pooler initialised as BERT's), which any
transformers install loads; a MiniMoE student in the registered `minimoe-student` format (transformers' Auto
classes know it after `import pipeline`). `--sentence-transformers` adds the sentence-transformers modules
(pooling and normalisation taken from the teacher when it is a sentence-transformers model, else mean pooling).
Every export writes a model card README.md (pipeline.model_card). The dir is written under a temporary name,
then renamed; its files are readable by others (0644).

DeepSpeed writes a MoE model as one file of non-expert weights (mp_rank_00_model_states.pt) plus one
file per expert with its GLOBAL id (layer_{L}_expert_{E}_mp_rank_00_model_states.pt), whichever
expert-parallel rank held it; zero_to_fp32.py does not understand those files, so this merges them
itself. The result loads in one process whatever ep_size it was trained with; training-only parts (MiniMoE's
relation projection, TinyBERT's W_h) are dropped, so a MiniMoE 3L;384H exports 27.88 M of its 28.32 M
distillation-time parameters. In a bf16/fp16 run the weights are the engine's half-precision module weights,
saved as fp32.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from minimoe_common.cli import InputError, check_output_dir, command
from minimoe_common.files import read_json, write_json, write_text, written_dir
from minimoe_common.tokenizer import load_tokenizer
from pipeline import checkpoint
from pipeline.model_card import DEFAULT_LICENSE, model_card, read_results
from pipeline.models import TRAINING_ONLY_PREFIXES, Student, StudentConfig
from pipeline.models.hf_export import is_plain_bert, save_as_bert

MODEL_STATES = "mp_rank_00_model_states.pt"
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
# Without a sentence-transformers teacher: mean pooling (the most common sentence-embedding recipe, and the
# packaged teacher's), in the format every sentence-transformers version reads.
MEAN_POOLING = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False}


def step_dir_of(path: str | Path) -> Path:
    """A step dir, or a checkpoints dir / run dir holding `latest` -> the step dir to export."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        tag = checkpoint.latest_tag(root)
        if tag is not None:
            return root / tag
    if (path / checkpoint.TRAINER_STATE).is_file():
        return path
    raise FileNotFoundError(f"{path}: neither a checkpoint step dir (with {checkpoint.TRAINER_STATE}) nor a dir with a "
                            f"'latest' checkpoint (a run's output dir or its checkpoints/)")


def merged_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Non-expert weights + every expert file (keys already carry global expert ids), in fp32, without the
    training-only parts: the TinyBERT projection and MiniMoE's relation projection."""
    state = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    for expert_file in sorted(step_dir.glob("layer_*_expert_*_" + MODEL_STATES)):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=True))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if not k.startswith(TRAINING_ONLY_PREFIXES)}


def load_student(step_dir: Path, state: dict[str, Any], random_init: bool = False) -> Student:
    """The checkpoint's student, without the training-only parts; with `random_init` the weights its run started
    from (the same config and seed, before any step): the random-initialisation baseline of the distilled one."""
    source = str(step_dir / checkpoint.TRAINER_STATE)
    config = StudentConfig.from_dict({**state["student"], "relation_projection": False}, source=source)
    student = Student(config)
    if random_init:
        from pipeline.distill import build_student  # the run's own construction: its RNG draws give its weights

        initial = build_student(StudentConfig.from_dict(state["student"], source=source), state["config"]["seed"])
        weights = {k: v for k, v in initial.state_dict().items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    else:
        weights = merged_state_dict(step_dir)
    missing, unexpected = sorted(set(student.state_dict()) - set(weights)), sorted(set(weights) - set(student.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{step_dir}: checkpoint weights do not match the student config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    student.load_state_dict(weights)
    return student


def write_sentence_transformers(directory: Path, teacher: Path, config: StudentConfig) -> str:
    """The sentence-transformers modules of a model dir: the transformer (the dir itself), the pooling, and
    normalisation when the teacher normalises. A sentence-transformers teacher gives its pooling, normalisation,
    max_seq_length, lower-casing, prompts and similarity function; other teachers get mean pooling, the
    student's positions as max_seq_length and cosine similarity. Returns what the modules do, in words."""
    def teacher_json(name: str, default: Any) -> Any:
        return read_json(teacher / name) if (teacher / name).is_file() else default

    teacher_modules = {module["type"].rsplit(".", 1)[-1]: module for module in teacher_json("modules.json", [])}
    not_carried = sorted(set(teacher_modules) - {"Transformer", "Pooling", "Normalize"})
    if not_carried:  # e.g. a Dense projection: its weights are in the teacher's width
        print(f"warning: {teacher / 'modules.json'}: module(s) {', '.join(not_carried)} not carried over", file=sys.stderr)
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER}]
    for idx, kind in enumerate(["Pooling"] + (["Normalize"] if "Normalize" in teacher_modules else []), start=1):
        source = teacher / teacher_modules[kind]["path"] if kind in teacher_modules else None
        if source is not None and source.is_dir():
            shutil.copytree(source, directory / f"{idx}_{kind}")
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_{kind}", "type": f"sentence_transformers.models.{kind}"})
    write_json(directory / "modules.json", modules)
    pooling_file = directory / "1_Pooling" / "config.json"
    pooling = read_json(pooling_file) if pooling_file.is_file() else MEAN_POOLING
    dimension = "embedding_dimension" if "embedding_dimension" in pooling else "word_embedding_dimension"
    pooling_file.parent.mkdir(exist_ok=True)
    write_json(pooling_file, {**pooling, dimension: config.hidden_size})
    bert_config = teacher_json("sentence_bert_config.json", {})
    write_json(directory / "sentence_bert_config.json",
               {"max_seq_length": min(bert_config.get("max_seq_length", config.max_position_embeddings),
                                      config.max_position_embeddings),
                "do_lower_case": bert_config.get("do_lower_case", False)})
    st_config = teacher_json("config_sentence_transformers.json", {})
    write_json(directory / "config_sentence_transformers.json",
               {"model_type": "SentenceTransformer", "prompts": st_config.get("prompts", {}),
                "default_prompt_name": st_config.get("default_prompt_name"),
                "similarity_fn_name": st_config.get("similarity_fn_name") or "cosine"})
    mode = pooling.get("pooling_mode") or ", ".join(key.removeprefix("pooling_mode_").removesuffix("_tokens")
                                                     for key, on in pooling.items() if key.startswith("pooling_mode_") and on is True)
    source = ("the teacher's" if "Pooling" in teacher_modules else "the default: the teacher dir is not found at export"
              if not teacher.is_dir() else "the default: the teacher is not a sentence-transformers model")
    return f"{mode} pooling{', then L2 normalisation' if len(modules) > 2 else ''} ({source})"


def export(checkpoint_path: str | Path, out_dir: str | Path, sentence_transformers: bool = False,
           license: str = DEFAULT_LICENSE, base_model: str | None = None, results: list[str] = (),
           random_init: bool = False) -> Path:
    """Write OUT_DIR (config.json, model.safetensors, tokenizer, model card; with `sentence_transformers` the
    sentence-transformers modules) from a checkpoint; returns the step dir used."""
    out_dir = Path(out_dir)
    check_output_dir(str(out_dir), "OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise InputError(f"OUT_DIR {out_dir}: a non-empty dir that is not a model dir (an export replaces the dir whole)")
    finetuned = [read_results(path) for path in results]
    step_dir = step_dir_of(checkpoint_path)
    state = checkpoint.read_trainer_state(step_dir)
    student = load_student(step_dir, state, random_init)
    if random_init:
        state = {**state, "step": 0, "tokens_seen": 0}
    with written_dir(out_dir) as tmp:
        if is_plain_bert(student.config):
            save_as_bert(student, tmp)
        else:
            student.save_pretrained(tmp)
        load_tokenizer(str(step_dir / "tokenizer")).save_pretrained(str(tmp))
        pooling = (write_sentence_transformers(tmp, Path(state["config"]["teacher"]), student.config)
                   if sentence_transformers else None)
        write_text(tmp / "README.md", model_card(tmp, out_dir.name, state, pooling, license, base_model, finetuned))
    return step_dir


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="minimoe-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's output dir, its checkpoints/ dir (the latest is taken) or a step-N dir")
    parser.add_argument("out_dir", help="model dir to write (config.json, model.safetensors, tokenizer files, README.md)")
    parser.add_argument("--sentence-transformers", action="store_true",
                        help="also write the sentence-transformers modules (modules.json, pooling, normalisation)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"license of the model card (default {DEFAULT_LICENSE})")
    parser.add_argument("--base-model", help="the teacher's model hub id for the model card (default: known for the "
                                             "packaged teacher and for teachers in the Hugging Face cache)")
    parser.add_argument("--results", nargs="+", default=[], metavar="RESULTS_JSON",
                        help="minimoe-finetune results.json files (one per task) to list in the model card")
    parser.add_argument("--random-init", action="store_true",
                        help="write the weights the run started from (same config and seed, step 0) instead: the "
                             "random-initialisation baseline to finetune next to the distilled student")
    args = parser.parse_args(argv)
    step_dir = export(args.checkpoint, args.out_dir, args.sentence_transformers, args.license, args.base_model,
                      args.results, args.random_init)
    print(f"exported {step_dir} -> {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
