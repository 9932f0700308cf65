"""Run by test_model_multiproc.py under `deepspeed --num_gpus 2`: a MoE student with ep_size 2 inside the
DeepSpeed engine saves itself (experts gathered over the expert group) and records each rank's local
experts and its all-to-all eval output for the single-process check."""
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import Student, StudentConfig  # noqa: E402
from pipeline.optim import init_distributed  # noqa: E402

out_dir = Path(sys.argv[-1])  # the launcher puts --local_rank=N first
init_distributed()  # (the project's: DeepSpeed's gloo init, its /dev/shm buffer unlinked once mapped)
rank = torch.distributed.get_rank()
torch.manual_seed(rank)  # each rank's experts differ
model = Student(StudentConfig(num_layers=2, hidden_size=24, num_heads=2, vocab_size=50, num_experts=4, dropout=0.0),
                deepspeed_moe=True, ep_size=2)
for name, param in model.named_parameters():  # replicated (non-expert) parameters equal on all ranks
    if "deepspeed_experts" not in name:
        torch.distributed.broadcast(param.data, 0)
deepspeed.initialize(model=model, config={"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1})
model.save_pretrained(out_dir / "model")
torch.save({k: v for k, v in model.state_dict().items() if "deepspeed_experts" in k}, out_dir / f"local{rank}.pt")
torch.manual_seed(0)
ids = torch.randint(3, 50, (2, 8))
with torch.no_grad():
    torch.save(model.eval()(ids, torch.ones_like(ids)).last_hidden_state, out_dir / f"out{rank}.pt")
