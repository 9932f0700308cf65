"""pipeline.distill, with rank $KILL_RANK SIGKILLing itself halfway through the first file that it writes into
checkpoint $KILL_TAG: a real kill during a checkpoint write, at a known point (tests/test_cluster.py).

Run by the deepspeed launcher as the ranks' script (it appends --local_rank=N)."""
import io
import os
import signal
import sys

import torch

from pipeline import distill

save = torch.save


def save_or_die(obj, f, *args, **kwargs):
    """torch.save; on the doomed rank, into the doomed checkpoint: half the bytes, then SIGKILL."""
    if os.environ["RANK"] != os.environ["KILL_RANK"] or os.environ["KILL_TAG"] not in str(f):
        return save(obj, f, *args, **kwargs)
    data = io.BytesIO()
    save(obj, data, *args, **kwargs)
    with open(f, "wb") as out:
        out.write(data.getbuffer()[: data.tell() // 2])
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = save_or_die  # DeepSpeed's checkpoint engine and pipeline.checkpoint call torch.save at write time
sys.exit(distill.main(sys.argv[1:]))
