"""Run by test_model_multiproc.py under `deepspeed --num_gpus 2`: one MoE FFN with ep_size 2, the exact-count
exchange (our forward) against DeepSpeed's capacity-padded all-to-all (deepspeed.moe.layer.MoE.forward) on the
same weights, inputs and router noise: outputs, aux loss, counts and every gradient. Writes OUT/ok{rank}."""
import sys
from pathlib import Path

import torch
from deepspeed.moe.layer import MoE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import StudentConfig  # noqa: E402
from pipeline.models.moe import moe_feed_forward  # noqa: E402
from pipeline.optim import init_distributed  # noqa: E402

out_dir = Path(sys.argv[-1])  # the launcher puts --local_rank=N first
init_distributed()  # (the project's: DeepSpeed's gloo init, its /dev/shm buffer unlinked once mapped)
rank = torch.distributed.get_rank()
config = StudentConfig(hidden_size=16, intermediate_size=32, num_heads=2, num_experts=4, dropout=0.0)
torch.manual_seed(rank)  # each rank's experts (and inputs) differ
block = moe_feed_forward(config, deepspeed_moe=True, ep_size=2)
block.set_deepspeed_parallelism()
gate = block.deepspeed_moe.gate
with torch.no_grad():
    gate.wg.bias[0] += 1.0  # skewed routing: expert 0 busiest, as on an untrained router
for param in gate.parameters():
    torch.distributed.broadcast(param.data, 0)
x = torch.randn(8, 16, 16)
used = torch.ones(128, dtype=torch.long)
used[-20:] = 0  # padding: not routed, not counted
weights = torch.randn(8, 16, 16)


def run(forward):
    torch.manual_seed(100)  # the same LogitJitter draws
    inputs = x.clone().requires_grad_(True)
    block.zero_grad()
    y, l_aux, counts = forward(inputs, used)
    ((y * weights).sum() + l_aux).backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return y.detach(), l_aux.detach(), counts, inputs.grad, grads


block.train()
ours, deepspeeds = run(block), run(lambda h, u: MoE.forward(block, h, u))
for name, a, b in zip(("output", "l_aux", "counts", "input grad"), ours[:4], deepspeeds[:4]):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"rank {rank} {name}: {m}")
for name in ours[4]:
    torch.testing.assert_close(ours[4][name], deepspeeds[4][name], atol=1e-6, rtol=1e-5,
                               msg=lambda m: f"rank {rank} grad {name}: {m}")
# Every expert gets tokens from this rank (else regrouping would go untested), expert 0 the most.
assert int(ours[2].sum()) == 108 and ours[2].min() > 0 and ours[2][0] == ours[2].max(), ours[2]
(out_dir / f"ok{rank}").write_text(f"{ours[2].tolist()}\n")
