"""Thread settings for processes that share CPU cores: local block servers and their clients.

OpenMP (torch's CPU thread pool) decides what an idle pool thread does between parallel
regions. Measured on a 2-core machine with three block servers and a client:

- ``OMP_WAIT_POLICY=ACTIVE`` (spin forever): idle threads burn the cores the other
  processes need; a swarm runs at 0.15x.
- ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once): every parallel region has to wake its
  threads, so a 2-thread pass is no faster than a 1-thread one (16 decode rows through 10
  blocks: 33 ms either way).
- a short spin (``GOMP_SPINCOUNT=20000``, tens of microseconds, with the policy unset):
  a pass's threads stay awake from one op to the next and sleep soon after the pass;
  16 rows take 24 ms on 2 threads, and 16 sessions through the swarm run 1.3x faster
  than with PASSIVE.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

SHARED_CORES_SPIN = "20000"


def shared_cores_env(environ: Mapping[str, str]) -> dict[str, str]:
    """OpenMP settings for a process sharing cores with others; the user's own settings win.

    Takes effect only in a process that has not loaded torch yet (a child's environment,
    or os.environ before the first ``import torch``)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"GOMP_SPINCOUNT": SHARED_CORES_SPIN}


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch threads in this thread (OpenMP thread counts are per thread); 0: as is."""
    import torch  # here, not at the top: the CLI reads shared_cores_env() before torch is loaded

    before = torch.get_num_threads()
    if not threads or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
