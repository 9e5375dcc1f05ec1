"""`python -m lora_worker.runtime.parallel.rank <group dir>`: one rank of a job's process group,
started by agent.py.

Rank 0 runs the whole job story (`job.run_claimed`: events, result, evaluation, delivery) under the
worker's claim on the job folder; the others wait for its handoff, load the model, train, and exit.
A rank that ends on an error leaves a note (`exit-rank<r>.json`); an out-of-memory error leaves the
splits so far, and the worker relaunches the group with smaller micro-batches.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lora_worker.runtime import job, outcomes, redaction
from lora_worker.runtime.device import detect_device
from lora_worker.runtime.files import atomic_write_json
from lora_worker.runtime.jobdir import JobPaths, JobRefused
from lora_worker.runtime.model.load import load_tokenizer
from lora_worker.runtime.model.prepare import load_for_training
from lora_worker.runtime.parallel.agent import watch_parent
from lora_worker.runtime.parallel.handoff import Group
from lora_worker.runtime.parallel.relay import TRAIN, serve
from lora_worker.runtime.parallel.rundir import GroupDir, LaunchRequest, ProgressFile, RankExit
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobSpec, parse_job_input
from lora_worker.runtime.training.ranks import GroupOutOfMemory, Ranks
from lora_worker.runtime.training.trainer import COLLECTIVE_TIMEOUT_S, train

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.25
ORPHANED_EXIT = 3  # the agent that started this rank is gone


def open_group(rank: int, world: int, handoff_wait_s: float) -> Ranks:
    """The default process group (NCCL on CUDA, gloo on the CPU) and a gloo group for the handoff and
    the per-step decisions: small CPU objects, and a wait as long as rank 0's preparation."""
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(0)  # virtual local rank: each rank sees its own GPU as device 0
    dist.init_process_group(
        "nccl" if on_cuda else "gloo",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=handoff_wait_s))
    return Ranks(rank, world, control)


def poll_flag(flag: Path, event: threading.Event) -> None:
    """Set `event` once the file `flag` exists (the worker's /cancel), from a daemon thread."""

    def watch() -> None:
        while not flag.exists():
            time.sleep(CANCEL_POLL_S)
        event.set()

    threading.Thread(target=watch, name="cancel-watch", daemon=True).start()


def job_spec(request: LaunchRequest) -> JobSpec:
    runpod_id = (request.runpod_job or {}).get("id", request.default_job_id)
    return parse_job_input(request.job_input, runpod_job_id=runpod_id)  # validated by the worker already


def lead(group: Group, request: LaunchRequest, gdir: GroupDir, settings: Settings) -> int:
    """Rank 0: the job, as in one process, with the other ranks joining for training."""
    redaction.install(settings.secrets())
    cancel = threading.Event()
    poll_flag(gdir.cancel_flag, cancel)
    spec = job_spec(request)
    paths = JobPaths(settings.job_dir(spec.job_id), spec.job_id)
    device = detect_device()
    try:
        output = job.run_claimed(
            spec, paths, device, settings, runpod_job=request.runpod_job, cancel=cancel,
            channels=(ProgressFile(gdir),), processes=group.ranks.world, group=group,
            held_s=max(0.0, time.time() - request.launched_at) if request.launched_at else 0.0,
        )  # fmt: skip
    except JobRefused as err:  # as in one process: the refusal goes to this delivery only
        log.warning("job %s: %s", spec.job_id, err)
        output = outcomes.refused(spec.job_id, str(err), device)
    finally:
        group.close()  # the other ranks exit, if they wait for rank 0
    atomic_write_json(gdir.output_file, output)
    return 0


def follow(group: Group, settings: Settings) -> int:
    """Ranks > 0: wait for rank 0's handoff, load the same model, train, exit. Sharded, serve rank 0's
    forwards before and after training too (relay.py)."""
    handoff = group.receive()
    if handoff is None:
        return 0
    tokenizer = load_tokenizer(handoff.weights.path)
    loaded = load_for_training(
        handoff.weights, tokenizer, handoff.spec, settings.volume_dir, shard_over=handoff.shard_over
    )
    sharded = handoff.shard_over > 1
    if sharded and serve(loaded.model, group.ranks) != TRAIN:
        return 0
    train(
        loaded.model, handoff.train, handoff.pad_id, handoff.cfg, [], resume=handoff.resume,
        ranks=group.ranks, recoveries=group.recoveries,
    )  # fmt: skip
    if sharded:
        serve(loaded.model, group.ranks)  # rank 0's evaluation and the adapter's gathering, to the end
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"
    )
    watch_parent(lambda: os._exit(ORPHANED_EXIT))
    gdir = GroupDir(Path(argv[0]))
    request = LaunchRequest.from_env()
    settings = Settings.from_env()
    try:
        spec = job_spec(request)
        group = Group(open_group(rank, world, spec.max_duration_hours * 3600 + 3600), request.recoveries)
        code = lead(group, request, gdir, settings) if rank == 0 else follow(group, settings)
    except GroupOutOfMemory as err:
        log.warning("%s", err)
        gdir.write_exit(RankExit(rank, "out_of_memory", str(err), err.recoveries))
        code = 1
    except BaseException as err:  # noqa: BLE001  every ending leaves a readable note for the worker
        log.error("rank %d failed:\n%s", rank, traceback.format_exc())
        gdir.write_exit(RankExit(rank, "error", outcomes.describe(err)))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # no collective teardown: a peer may be gone already, and waiting on it would hang this rank
    os._exit(code)


if __name__ == "__main__":
    main()
