"""A grid of runs per task (the best dev run kept), suites of models x tasks, the paper's table and GLUE score."""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

from minimoe_common.cli import changed_fields
from minimoe_common.files import write_json
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.run import is_main_process, train_run
from pipeline.tasks import PAPER_COLUMNS, TASKS, Task, find_task_dir, get_task

# The paper's column headers (Table 2); the columns follow the order of TASKS, with the GLUE score after
# the last task it averages.
COLUMN_TITLES = {"sst2": "SST-2 Acc", "mrpc": "MRPC F1", "stsb": "STS-B SpCorr", "qqp": "QQP F1",
                 "mnli": "MNLI-m/mm Acc", "qnli": "QNLI Acc", "rte": "RTE Acc", "glue": "GLUE Score",
                 "conll2003": "CoNLL F1", "cola": "CoLA Mcc"}


def finetune(config: FinetuneConfig) -> dict:
    """Run the (lr x batch x seed) grid; the best dev run's results become output/results.json."""
    output = Path(config.output)
    grid = list(itertools.product(config.lr, config.batch_size, config.seed))
    if len(grid) == 1:
        return train_run(config, *grid[0], output)
    runs = [train_run(config, lr, bs, seed, output / "runs" / f"lr{lr:g}-bs{bs}-seed{seed}") for lr, bs, seed in grid]
    best = max(runs, key=lambda r: r["score"])
    summary = {**best, "grid": [{k: r[k] for k in ("lr", "batch_size", "seed", "score", "best_step")} for r in runs]}
    if is_main_process():
        write_json(output / "results.json", summary)
    return summary


def paper_numbers(results: dict[str, dict]) -> dict[str, float]:
    """Task results (name -> results.json) -> the paper's numbers by column: sst2, mrpc, ..., conll2003, cola."""
    numbers = {}
    for name, result in results.items():
        task = TASKS[name]
        for dev_name, metrics in result["metrics"].items():
            numbers[dev_name] = metrics[task.metrics[0]]
    return numbers


def glue_score(numbers: dict[str, float]) -> tuple[float | None, list[str]]:
    """The paper's GLUE score: the mean of the 8 numbers of PAPER_COLUMNS that are present (and which)."""
    present = [c for c in PAPER_COLUMNS if c in numbers]
    return (sum(numbers[c] for c in present) / len(present) if present else None), present


def table_columns() -> list[str]:
    """Task names in the order of TASKS, "glue" after the last task of the GLUE score."""
    names = list(TASKS)
    after = 1 + max(i for i, name in enumerate(names) if TASKS[name].in_glue_score)
    return [*names[:after], "glue", *names[after:]]


def model_scale(model_dir: str) -> dict[str, float | None]:
    """{"params", "gflops"} of a row's model, from the compute report (the paper's convention: GFLOPs =
    transformer-layer parameters one token passes through x 128; params = the encoder's, embeddings and any pooler
    included); None when the report cannot read the model."""
    from pipeline.report import compute_report

    try:
        report = compute_report(model_dir, throughput=False)
    except (ValueError, OSError) as e:
        print(f"warning: {model_dir}: no Params/GFLOPs in results.md ({e})", file=sys.stderr)
        return {"params": None, "gflops": None}
    return {"params": report.deployable_params, "gflops": round(report.gflops, 4)}


def results_table(rows: dict[str, dict[str, float]], scales: dict[str, dict[str, float | None]] | None = None) -> str:
    """Markdown table in the paper's column order (Table 2), one row per model, after its Params and GFLOPs
    (`scales`: row name -> model_scale); '-' = not run or not known."""
    columns = table_columns()
    lines = ["| Model | Params | GFLOPs | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|---|" + "---:|" * (len(columns) + 2)]
    notes = []
    for name, numbers in rows.items():
        glue, used = glue_score(numbers)
        cells = {**{c: f"{v:.1f}" for c, v in numbers.items()}, "glue": "-" if glue is None else f"{glue:.1f}"}
        cells["mnli"] = "/".join(cells.get(c, "-") for c in ("mnli-m", "mnli-mm"))
        cells["mnli"] = "-" if cells["mnli"] == "-/-" else cells["mnli"]
        scale = (scales or {}).get(name, {})
        params = "-" if scale.get("params") is None else f"{scale['params'] / 1e6:.1f}M"
        gflops = "-" if scale.get("gflops") is None else f"{scale['gflops']:.2f}"
        lines.append(f"| {name} | {params} | {gflops} | " + " | ".join(cells.get(c, "-") for c in columns) + " |")
        missing = [c for c in PAPER_COLUMNS if c not in used]
        notes.append(f"- {name}: GLUE score = mean of {len(used)} of 8 ({', '.join(used) or 'none'})"
                     + (f"; missing: {', '.join(missing)}" if missing else ""))
    return "\n".join(lines + [""] + notes + ["", "CoLA is not part of the paper's GLUE score."]) + "\n"


def row_models(specs: list[str]) -> dict[str, str]:
    """--model values -> {row name: model dir}. "NAME=DIR" names the row, a bare DIR is named after its folder;
    two rows of one name are refused (they would share one run dir and the second would never be trained)."""
    rows: dict[str, str] = {}
    for spec in specs:
        name, _, model = spec.rpartition("=")
        name = name or Path(model).name
        if name in rows:
            raise ValueError(f"--model: two models named {name!r} ({rows[name]} and {model}); name the rows: NAME=DIR")
        rows[name] = model
    return rows


def present_tasks(data_dir: str, names: list[str] | None) -> tuple[list[tuple[Task, Path]], dict[str, str]]:
    """(the tasks to run with their folders, {skipped task: why}). A task asked for by --tasks whose files
    are missing is an error; with the default (every task) it is skipped and reported."""
    found, skipped = [], {}
    for name in names or TASKS:
        task = get_task(name)
        try:
            folder = find_task_dir(data_dir, task)
            missing = [f for f in (task.train_file, *task.dev_files.values()) if not (folder / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: no {', '.join(missing)}")
        except FileNotFoundError as e:
            if names:
                raise
            skipped[task.name] = str(e)
            continue
        found.append((task, folder))
    if not found:
        raise FileNotFoundError(f"--data-dir {data_dir}: no task has its files there: {'; '.join(skipped.values())}")
    return found, skipped


def reuse_or_train(run: FinetuneConfig, run_dir: Path) -> dict:
    """The run's results: an existing results.json trained with the same recipe (its `config`, the output dir
    aside; the suite resumes), or a new run. One of another recipe is refused rather than redone: redoing
    would silently replace results that may have cost hours, for what may be a mistyped flag."""
    path = run_dir / "results.json"
    if not path.is_file():
        return finetune(run)
    results = json.loads(path.read_text())
    # A field added since that run is at its default there: new fields default to the earlier behaviour.
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}
    changed = changed_fields({**defaults, **results.get("config", {})}, dataclasses.asdict(run),
                             paths=("model", "data_dir", "teacher", "deepspeed_config"), keep=("output",))
    if changed:
        raise ValueError(f"{path}: trained with another recipe ({'; '.join(changed)}); use another --output, "
                         f"or delete {run_dir} to retrain")
    return results


def suite(config: FinetuneConfig, models: list[str], tasks: list[str] | None) -> str:
    """Finetune every model on every task whose data is present (existing results.json of the same recipe
    are reused, so an interrupted suite resumes), then write results.md and results.json under config.output."""
    output, rows, scales, summary = Path(config.output), {}, {}, {}
    planned, skipped = present_tasks(config.data_dir, tasks)
    if skipped and is_main_process():
        print(f"skipped {len(skipped)} task(s): {'; '.join(f'{t} ({why})' for t, why in skipped.items())}",
              file=sys.stderr)
    for name, model in row_models(models).items():
        results = {}
        for k, (task, folder) in enumerate(planned, start=1):
            if is_main_process():
                print(f"{name}: task {k}/{len(planned)} {task.name}", file=sys.stderr)
            run_dir = output / name / task.name
            run = dataclasses.replace(config, model=model, task=task.name, data_dir=str(folder), output=str(run_dir))
            results[task.name] = reuse_or_train(run, run_dir)
        rows[name], scales[name] = paper_numbers(results), model_scale(model)
        summary[name] = {"numbers": rows[name], "glue_score": glue_score(rows[name])[0], **scales[name]}
    table = results_table(rows, scales) + (f"\nNot run (no files under --data-dir): {', '.join(skipped)}.\n" if skipped else "")
    if is_main_process():
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.md").write_text(table)
        write_json(output / "results.json", summary)
    return table
