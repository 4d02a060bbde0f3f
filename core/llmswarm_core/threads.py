"""Thread settings for processes that share CPU cores: local block servers and their clients.

OpenMP (torch's CPU thread pool) decides what an idle pool thread does between parallel
regions. Measured on a 2-core machine with three block servers and a client:

- ``OMP_WAIT_POLICY=ACTIVE`` (spin forever): idle threads burn the cores the other
  processes need; a swarm runs at 0.15x.
- a short spin (``GOMP_SPINCOUNT=20000``): a lone 16-row pass takes 24 ms on 2 threads
  instead of 33, and 16 sessions sometimes reach 120 tok/s; but whenever two servers run
  2-thread passes at once, 4 threads spin-wait on 2 cores: servers burn 3.5x the CPU and
  the swarm drops to 40 tok/s (seen in 3 of 8 runs). Not a safe default.
- ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once): every parallel region has to wake its
  threads, so a multi-threaded pass is no faster than a one-thread pass; hence servers run
  decode passes on one thread and the client its per-token work (ClientConfig.decode_threads).
  Steady: 16 sessions 93-102 tok/s in every run. This is the default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


def shared_cores_env(environ: Mapping[str, str]) -> dict[str, str]:
    """OpenMP settings for a process sharing cores with others; the user's own settings win.

    Takes effect only in a process that has not loaded torch yet (a child's environment,
    or os.environ before the first ``import torch``)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
