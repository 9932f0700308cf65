"""How often the training-time expert choice equals the eval-time one, for each router noise policy.

    python benchmarks/bench_router.py [--tokens 100000] [--experts 4]

The router of a MiniMoE student (pipeline.models.Router) scores random tokens (H = 384) with its weights
rescaled so that the routing logits have a given std; each policy's training-mode choice is compared with
the noiseless argmax. Prints a Markdown table (rows: policies, columns: logit std).
"""
from __future__ import annotations

import argparse

import torch

from pipeline.models import ROUTER_NOISE, StudentConfig
from pipeline.models.moe import Router

LOGIT_STDS = (0.25, 0.5, 1.0, 2.0)


def agreement(noise: str | None, logit_std: float, tokens: int, experts: int, hidden: int = 384) -> float:
    torch.manual_seed(0)
    gate = Router(StudentConfig(hidden_size=hidden, num_experts=experts, router_noise=noise), experts)
    with torch.no_grad():
        gate.wg.weight.normal_(std=logit_std / hidden ** 0.5)
        gate.wg.bias.zero_()
        x = torch.randn(tokens, hidden)
        eval_choice = gate.eval().choose(gate.logits(x))[1]
        train_choice = gate.train().choose(gate.logits(x))[1]
    return (train_choice == eval_choice).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="routed tokens per cell (default 100000)")
    parser.add_argument("--experts", type=int, default=4, help="experts (default 4, the paper's)")
    args = parser.parse_args()
    print("| policy | " + " | ".join(f"logit std {s}" for s in LOGIT_STDS) + " |")
    print("|---|" + "---:|" * len(LOGIT_STDS))
    for noise in ROUTER_NOISE:
        cells = [f"{agreement(noise, s, args.tokens, args.experts):.1%}" for s in LOGIT_STDS]
        print(f"| {noise or 'none'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
