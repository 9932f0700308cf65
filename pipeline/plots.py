"""A distillation run in one picture: OUTPUT/curves.png from metrics.jsonl, the loss and its parts over the steps
and, for MoE students, every MoE layer's expert shares (the token share each expert got per logged interval)."""
from __future__ import annotations

import json
import os
from pathlib import Path

LOSS_KEYS = ("loss", "qq", "kk", "vv", "embedding", "attention", "hidden", "aux")


def plot_run(run_dir: str | Path) -> Path | None:
    """Write run_dir/curves.png (whole: a temporary name, then a rename); None when nothing was logged yet."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    shares = [r["expert_shares"] for r in records if "expert_shares" in r]
    layers = len(shares[-1]) if shares else 0
    fig, axes = plt.subplots(1, 1 + layers, figsize=(4.2 * (1 + layers), 3.4), squeeze=False)
    loss = axes[0][0]
    for key in LOSS_KEYS:
        if key in records[0]:
            loss.plot(steps, [r[key] for r in records], label=key, linewidth=2 if key == "loss" else 1)
    loss.set(xlabel="step", title="distillation loss", yscale="log")
    loss.legend(fontsize="small")
    share_steps = [r["step"] for r in records if "expert_shares" in r]
    for layer, ax in enumerate(axes[0][1:]):
        per_expert = list(zip(*(record[layer] for record in shares)))
        ax.stackplot(share_steps, per_expert, labels=[f"expert {e}" for e in range(len(per_expert))])
        ax.set(xlabel="step", ylim=(0, 1), title=f"MoE layer {layer}: token shares")
    if layers:
        axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path, tmp = run_dir / "curves.png", run_dir / f"curves.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
