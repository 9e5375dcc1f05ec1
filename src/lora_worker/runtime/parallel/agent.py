"""`python -m lora_worker.runtime.parallel.agent <group dir>`: one launch of a job's process group.

torchrun's own launcher (`torch.distributed.launcher.api.elastic_launch`, what `torchrun --standalone
--nproc-per-node N` runs) starts N rank processes on this machine with a c10d rendezvous on a free
local port, watches them, and when one fails stops the others (SIGTERM, then SIGKILL) instead of
letting them wait in a collective. Called here rather than through the `torchrun` command line so
that the failed ranks come back as data (rank, exit code or signal) for the job's failure message.

`virtual_local_rank`: each rank sees only its own GPU, as device 0 (CUDA_VISIBLE_DEVICES), so the
model loader's `device_map={"": 0}` puts each rank's copy on its own card.

The agent stops its group when the worker that started it is gone (its parent changed), so a
worker that dies never leaves ranks training on its GPUs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from lora_worker.runtime.files import atomic_write_json
from lora_worker.runtime.parallel.rundir import GroupDir, LaunchRequest

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.5  # how often the agent checks its ranks
PARENT_POLL_S = 0.5


def watch_parent(on_orphaned) -> None:
    """Call `on_orphaned()` (from a daemon thread) once this process's parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        on_orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def launch_config(processes: int) -> LaunchConfig:
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port on this machine, as torchrun --standalone
        max_restarts=0,  # a failed rank fails the launch; the worker decides what comes next
        monitor_interval=MONITOR_INTERVAL_S,
        virtual_local_rank=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s agent: %(message)s")
    group = GroupDir(Path(argv[0]))
    request = LaunchRequest.from_env()
    # SIGTERM to itself: the elastic agent then stops every rank before it exits
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    entry = ("-m", "lora_worker.runtime.parallel.rank", str(group.root))
    try:
        elastic_launch(launch_config(request.processes), sys.executable)(*entry)
    except ChildFailedError as err:
        first = err.get_first_failure()[0]
        order = [first, *sorted(r for r in err.failures if r != first)]
        failures = [{"rank": r, "exitcode": err.failures[r].exitcode} for r in order]
        atomic_write_json(group.group_exit, {"failures": failures})
        log.warning("process group failed: %s", failures)
        return 1
    atomic_write_json(group.group_exit, {"failures": []})
    return 0


if __name__ == "__main__":
    sys.exit(main())
