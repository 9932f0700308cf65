"""Library log lines off stdout: stdout is for results (`--json`, tables), stderr for what libraries say.

DeepSpeed's logger writes to stdout, and its MoE layer and communication ops `print`; transformers draws a
progress bar for every model it loads (once per rank). Installed when `pipeline` is imported, before any
DeepSpeed import."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator


class _ToStderr(logging.Filter):
    """Re-emit a logger's records on stderr and drop them from its own (stdout) handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False


def route_library_logs() -> None:
    logging.getLogger("DeepSpeed").addFilter(_ToStderr())  # the logger DeepSpeed creates on import
    # torch warns on DeepSpeed's calls of its old collective names, once per rank and step kind.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    # torch's Linear init on a layer that pruning left without heads or neurons (pipeline.baselines.prune): nothing to init.
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def prints_to_stderr() -> Iterator[None]:
    """Around library calls that `print` (DeepSpeed's op builds, its MoE group creation)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
