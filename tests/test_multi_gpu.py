"""Multi-GPU jobs on the CPU: two gloo processes under torchrun's launcher train the same optimizer
steps as one process; checkpoints move between 1 and 2 processes; /cancel stops every rank; a
killed rank fails the job naming it; an out-of-memory error on one rank relaunches the group with
smaller micro-batches.

Per-step losses of two processes match one process within 1e-3 (absolute, on losses near 6.5):
the same examples in every step, the loss normalised over the step's tokens on both ranks; what
differs is only the order in which gradients are summed (DDP's all-reduce), in bf16 weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_job, two_gpus

from lora_worker.runtime.device import Device
from lora_worker.runtime.job import run_job
from lora_worker.runtime.jobdir import JobPaths
from lora_worker.runtime.model.memory import GpuMemoryError, estimate_memory, sharded_memory
from lora_worker.runtime.parallel import fsdp
from lora_worker.runtime.parallel.launch import describe_end, group_environment, group_size
from lora_worker.runtime.parallel.rundir import GroupDir, LaunchRequest, RankExit
from lora_worker.runtime.plan import check_fits_each, padding_warnings, parallel_mode
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError, parse_job_input
from lora_worker.runtime.training.checkpoints import COMPLETE_MARKER, step_of
from lora_worker.runtime.training.oom import Recovery
from lora_worker.runtime.training.ranks import shard_schedule

TOLERANCE = 1e-3
JOB_END_S = 240  # a job on the tiny model, two processes, on a busy 2-core machine


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("accumulation", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_step_splits_across_ranks_without_changing_its_examples(accumulation, world):
    schedule = [[i] for i in range(11)]  # 11 micro-batches: the last step is short
    sharded, per_rank = shard_schedule(schedule, accumulation, world)
    assert len(sharded) % world == 0
    # read as the Trainer reads it: rank r gets items r, r + world, ...; a step is per_rank of them
    per_rank_items = [sharded[r::world] for r in range(world)]
    steps = -(-len(schedule) // accumulation)
    for step in range(steps):
        trained = sorted(
            i for items in per_rank_items for b in items[step * per_rank : (step + 1) * per_rank] for i in b
        )
        assert trained == list(range(step * accumulation, min(len(schedule), (step + 1) * accumulation)))
    assert sum(len(items) for items in per_rank_items) == len(sharded)


def test_padding_is_named_in_the_plan():
    assert padding_warnings(4, 2) == []
    (text,) = padding_warnings(3, 2)
    assert "gradient_accumulation_steps 3 is not a multiple of the 2 processes" in text
    assert "1 empty micro-batch," in text and "75%" in text and "4 would keep every one busy" in text


def test_processes_default_to_the_visible_gpus_and_cannot_exceed_them():
    spec = parse_job_input({"dataset_path": "x.json", "job_id": "j"})
    assert group_size(spec, Device("cpu", "cpu")) == 1
    assert group_size(spec, Device("cuda", "H100", count=4)) == 4
    two = parse_job_input({"dataset_path": "x.json", "job_id": "j", "distributed": {"num_processes": 2}})
    assert group_size(two, Device("cpu", "cpu")) == 2  # gloo processes on the CPU
    with pytest.raises(
        JobInputError, match="distributed.num_processes: 2 processes need 2 GPUs; this worker has 1"
    ):
        group_size(two, Device("cuda", "H100", count=1))


LLAMA3_70B = {
    "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672, "vocab_size": 128256,
    "num_attention_heads": 64, "num_key_value_heads": 8,
}  # fmt: skip


def test_the_memory_pre_flight_is_per_card_and_names_sharding_when_it_would_fit():
    whole = estimate_memory(LLAMA3_70B, lora_r=16, micro_batch_tokens=8192)
    sharded = sharded_memory(estimate_memory(LLAMA3_70B, lora_r=16, micro_batch_tokens=8192), 4, 80)
    small = Device("cuda", "NVIDIA L4", count=4, free_bytes=22 * 1024**3)
    with pytest.raises(GpuMemoryError) as one:
        check_fits_each(whole, small, 1, "single", sharded)
    assert "fsdp" not in str(one.value)
    with pytest.raises(
        GpuMemoryError, match="With 4 processes data parallel, each GPU holds the whole model"
    ) as dp:
        check_fits_each(whole, small, 4, "data_parallel", sharded)
    assert f"'fsdp' (or 'auto') shards it: about {sharded.peak_gib:.1f} GiB per GPU" in str(dp.value)
    h100s = Device("cuda", "H100", count=2, free_bytes=79 * 1024**3)
    check_fits_each(whole, h100s, 2, "data_parallel", sharded)  # fits each card


def test_sharding_divides_the_weights_and_the_optimizer_state_but_not_a_micro_batch():
    whole = estimate_memory(LLAMA3_70B, lora_r=16, micro_batch_tokens=8192, optimizer="adamw_torch")
    four = sharded_memory(whole, 4, 80)
    assert four.weights_gib == pytest.approx(whole.weights_gib / 4 + 2 * whole.weights_gib / 80)
    assert four.lora_gib == pytest.approx(whole.lora_gib / 4)
    assert (four.activations_gib, four.loss_gib) == (whole.activations_gib, whole.loss_gib)
    assert 30 < whole.weights_gib < 45 and four.weights_gib < 12  # 70B in NF4: ~37 GiB whole


def test_auto_shards_only_a_model_that_does_not_fit_one_gpu():
    spec = parse_job_input({"dataset_path": "x.json", "job_id": "j"})
    whole = estimate_memory(LLAMA3_70B, lora_r=16, micro_batch_tokens=8192)
    h100 = Device("cuda", "H100", count=2, free_bytes=79 * 1024**3)
    l4 = Device("cuda", "NVIDIA L4", count=8, free_bytes=22 * 1024**3)
    assert parallel_mode(spec, whole, h100, 1) == "single"
    assert parallel_mode(spec, whole, h100, 2) == "data_parallel"
    assert parallel_mode(spec, whole, l4, 8) == "fsdp"
    assert parallel_mode(spec, whole, Device("cpu", "cpu"), 2) == "data_parallel"  # no card to overflow
    asked = parse_job_input({"dataset_path": "x.json", "job_id": "j", "distributed": {"mode": "fsdp"}})
    assert parallel_mode(asked, whole, h100, 2) == "fsdp"
    with pytest.raises(JobInputError, match="distributed.mode: 'fsdp' shards the model across processes"):
        parallel_mode(asked, whole, h100, 1)


def test_an_optimizer_state_keyed_by_names_becomes_the_one_process_layout_and_back():
    names = ["a.lora_A.weight", "a.lora_B.weight", "b.lora_A.weight"]
    by_name = {
        "state": {
            n: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), float(i))} for i, n in enumerate(names)
        },
        "param_groups": [{"lr": 0.1, "weight_decay": 0.0, "params": names}],
    }
    by_index = fsdp.to_index_keyed(by_name, names)
    # what optimizer.state_dict() of one process holds for the same parameters
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2)) for _ in names])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    for p in model:
        p.grad = torch.ones(2)
    optimizer.step()
    one = optimizer.state_dict()
    assert sorted(by_index["state"]) == sorted(one["state"]) and by_index["param_groups"][0]["params"] == [
        0,
        1,
        2,
    ]
    assert one["param_groups"][0]["params"] == [0, 1, 2]
    assert float(by_index["state"][1]["exp_avg"][0]) == 1.0
    back = fsdp.to_name_keyed(by_index, names)
    assert back["param_groups"] == by_name["param_groups"]
    assert {n: float(s["exp_avg"][0]) for n, s in back["state"].items()} == {
        n: float(i) for i, n in enumerate(names)
    }


def test_the_ranks_get_the_settings_and_the_input_through_their_environment(tmp_path):
    settings = Settings.from_env(
        {"VOLUME_DIR": str(tmp_path), "WEBHOOK_SECRET": "s3cret", "KEEP_CHECKPOINTS": "1"}
    )
    upload = "https://bucket.example.com/a.tar.gz?X-Amz-Signature=abc123"
    request = LaunchRequest({"job_id": "j", "output": {"upload_url": upload}}, {"id": "rp"}, None, 2)
    env = group_environment(settings, request, base={"PATH": "/bin"})
    assert Settings.from_env(env) == settings
    assert LaunchRequest.from_env(env) == request
    assert env["OMP_NUM_THREADS"] == "1"


def test_a_group_that_died_says_which_rank_where_and_what_is_kept(tmp_path):
    paths = JobPaths(tmp_path / "job", "job")
    (paths.checkpoints / "checkpoint-4").mkdir(parents=True)
    (paths.checkpoints / "checkpoint-4" / COMPLETE_MARKER).write_text("{}")
    gdir = GroupDir(paths.root / "group")
    gdir.root.mkdir()
    (gdir.progress).write_text(json.dumps({"stage": "training", "step": 5, "total_steps": 9}))
    (gdir.group_exit).write_text(
        json.dumps({"failures": [{"rank": 1, "exitcode": -9}, {"rank": 0, "exitcode": -15}]})
    )
    end = describe_end(gdir, 2, paths, 1, cancelled=False)
    assert end.output is None and end.stage == "training" and not end.recoveries
    assert end.message == (
        "rank 1 of 2 was killed by SIGKILL during training (step 5 of 9); checkpoint at step 4 kept, "
        "resubmit the same job_id to resume"
    )
    gdir.write_exit(RankExit(1, "error", "disk I/O error"))
    assert describe_end(gdir, 2, paths, 1, cancelled=False).message.startswith(
        "rank 1 of 2 failed: disk I/O error during training (step 5 of 9)"
    )
    oom = Recovery(5, 512, 4, 2, "OutOfMemoryError: CUDA out of memory")
    gdir.write_exit(RankExit(0, "out_of_memory", "rank 0 ran out of memory at step 5", (oom,)))
    assert describe_end(gdir, 2, paths, 1, cancelled=False).recoveries == (oom,)


# ----------------------------------------------------------------------------- whole jobs


def test_a_dry_run_plans_for_every_process_without_launching_them(tiny_model, small_dataset, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "GPU_HOURLY_USD": "4.0"})
    result = run_job({**job(tiny_model, small_dataset, "plan", 2), "dry_run": True}, settings=settings)
    assert result["status"] == "completed" and result["dry_run"], result
    plan = result["plan"]
    assert (plan["processes"], plan["per_process_accumulation"]) == (2, 1)
    assert any("data parallel" in a for a in plan["assumptions"])
    for estimate in plan["estimates"]:  # every GPU of the job is paid for
        assert estimate["gpus"] == 2
        assert estimate["cost_usd"] == pytest.approx(estimate["seconds"]["total"] / 3600 * 4.0 * 2, abs=0.01)
    assert result["gpu"] == "2x cpu" and not (tmp_path / "jobs" / "plan" / "group.log").exists()


def job(tiny_model, small_dataset, job_id: str, processes: int, mode: str = "auto") -> dict:
    """Two epochs, two micro-batches per optimizer step (one per rank on two), a checkpoint every 2 steps."""
    return small_job(
        tiny_model,
        small_dataset,
        job_id=job_id,
        hyperparameters={"num_epochs": 3, "gradient_accumulation_steps": 2},
        training={"checkpoint_steps": 2, "eval_steps": 1000},
        evaluation={"num_samples": 0},
        output={"keep_checkpoints": True},
        distributed={"num_processes": processes, "mode": mode},
    )


def losses(result: dict) -> dict[int, float]:
    report = json.loads(Path(result["report"]["json"]).read_text())
    return {r["step"]: r["loss"] for r in report["history"]["train"]}


def assert_same_curve(result: dict, reference: dict) -> None:
    ref, got = losses(reference), losses(result)
    assert sorted(got) == sorted(ref)
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], abs=TOLERANCE), step
    assert result["metrics"]["eval_loss_after"] == pytest.approx(
        reference["metrics"]["eval_loss_after"], abs=TOLERANCE
    )


def rank_processes(volume: Path) -> dict[int, int]:
    """pid -> rank of the live rank processes of the jobs on one volume (read from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lora_worker.runtime.parallel.rank" in cmdline and f"VOLUME_DIR={volume}".encode() in environ:
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), -1)
            found[int(proc.name)] = rank
    return found


def in_thread(job_input: dict, settings: Settings, cancel: threading.Event) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(run_job(job_input, settings=settings, cancel=cancel)))
    thread.start()
    return thread, box


def wait_for_checkpoint(job_root: Path, thread: threading.Thread) -> int:
    deadline = time.monotonic() + JOB_END_S
    while not (done := list((job_root / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}"))):
        assert thread.is_alive(), "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint within {JOB_END_S} s"
        time.sleep(0.05)
    return step_of(done[0].parent)


def cancel_at_first_checkpoint(job_input: dict, settings: Settings) -> dict:
    """Run `job_input`, send /cancel once its first checkpoint is complete; its result."""
    cancel = threading.Event()
    thread, box = in_thread(job_input, settings, cancel)
    wait_for_checkpoint(settings.job_dir(job_input["job_id"]), thread)
    cancel.set()
    thread.join(JOB_END_S)
    assert not thread.is_alive(), "the cancelled job did not end"
    assert box["status"] == "cancelled", box
    return box


@pytest.fixture(scope="module")
def reference(tiny_model, small_dataset, tmp_path_factory) -> dict:
    volume = tmp_path_factory.mktemp("reference")
    result = run_job(
        job(tiny_model, small_dataset, "one", 1), settings=Settings.from_env({"VOLUME_DIR": str(volume)})
    )
    assert result["status"] == "completed", result
    return result


@pytest.mark.e2e
def test_two_processes_train_the_same_steps_as_one(tiny_model, small_dataset, tmp_path, reference):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    result = run_job(job(tiny_model, small_dataset, "two", 2), settings=settings)
    assert result["status"] == "completed", result
    assert_same_curve(result, reference)
    assert result["gpu"] == "2x cpu" and result["metrics"]["steps"] == reference["metrics"]["steps"]
    assert not rank_processes(tmp_path)
    # rank 0 alone wrote the job: one attempt, one event sequence, checkpoints with every rank's RNG
    (attempt,) = result["attempts"]
    assert attempt["status"] == "completed" and attempt["gpu"] == "2x cpu"
    markers = list((tmp_path / "jobs" / "two" / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    marker = json.loads(markers[0].read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= set(marker["files"])


@pytest.mark.e2e
def test_cancel_stops_both_ranks_and_one_process_resumes_on_the_same_curve(
    tiny_model, small_dataset, tmp_path, reference
):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    root = tmp_path / "jobs" / "moved"
    box = cancel_at_first_checkpoint(job(tiny_model, small_dataset, "moved", 2), settings)
    assert "checkpoint at step" in box["message"] and "kept" in box["message"]
    assert not rank_processes(tmp_path), "a rank outlived the cancelled job"
    kept = sorted(step_of(p.parent) for p in (root / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    assert kept and kept[-1] < reference["metrics"]["steps"]

    resumed = run_job(job(tiny_model, small_dataset, "moved", 1), settings=settings)
    assert resumed["status"] == "completed", resumed
    assert resumed["resumed_from_step"] == kept[-1]
    assert_same_curve(resumed, reference)


@pytest.mark.e2e
def test_a_one_process_checkpoint_resumes_on_two(tiny_model, small_dataset, tmp_path, reference):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    cancel_at_first_checkpoint(job(tiny_model, small_dataset, "grown", 1), settings)

    resumed = run_job(job(tiny_model, small_dataset, "grown", 2), settings=settings)
    assert resumed["status"] == "completed", resumed
    assert resumed["resumed_from_step"] is not None
    assert_same_curve(resumed, reference)


@pytest.mark.e2e
def test_a_killed_rank_fails_the_job_naming_it(tiny_model, small_dataset, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    root = tmp_path / "jobs" / "killed"
    thread, box = in_thread(job(tiny_model, small_dataset, "killed", 2), settings, threading.Event())
    kept = wait_for_checkpoint(root, thread)
    (rank1,) = [pid for pid, rank in rank_processes(tmp_path).items() if rank == 1]
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(JOB_END_S)
    assert not thread.is_alive(), "the job hung after a rank died"
    assert time.monotonic() - killed_at < 120  # the launcher noticed; no collective timeout was waited out
    assert box["status"] == "failed", box
    assert box["error"].startswith("rank 1 of 2 was killed by SIGKILL during training (step "), box["error"]
    assert "kept, resubmit the same job_id to resume" in box["error"]
    assert f"checkpoint at step {kept}" in box["error"] or "checkpoint at step" in box["error"]
    stored = json.loads((root / "result.json").read_text())
    assert stored["status"] == "failed" and stored["error"] == box["error"]
    (attempt,) = stored["attempts"]
    assert attempt["status"] == "failed" and attempt["seconds"] > 0
    assert not rank_processes(tmp_path), "rank 0 outlived the failed job"
    log = (root / "group.log").read_text()  # the group's output, kept beside the failure
    assert "rank0 " in log and "'rank': 1, 'exitcode': -9" in log


@pytest.mark.e2e
def test_a_worker_that_dies_takes_its_process_group_with_it(tiny_model, small_dataset, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": job(tiny_model, small_dataset, "orphan", 2)}))
    worker = subprocess.Popen(
        [sys.executable, "-m", "lora_worker", "run", str(spec)],
        cwd=REPO,
        env={**os.environ, "VOLUME_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + JOB_END_S
        while not list(
            (tmp_path / "jobs" / "orphan" / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}")
        ):
            assert worker.poll() is None and time.monotonic() < deadline, "no checkpoint while the worker ran"
            time.sleep(0.05)
        assert len(rank_processes(tmp_path)) == 2
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 90  # the agent sees its parent gone within 0.5 s, then stops its ranks
    while rank_processes(tmp_path):
        assert time.monotonic() < deadline, f"ranks outlived their worker: {rank_processes(tmp_path)}"
        time.sleep(0.2)


INJECT_OOM = """
import os, pathlib

if os.environ.get("RANK") == "1":
    import torch

    fired = pathlib.Path(os.environ["OOM_MARKER"])
    seen = {"forwards": 0}

    def _oom(module, args, output):
        if type(module).__name__ != "LlamaDecoderLayer" or not module.training or fired.exists():
            return None
        seen["forwards"] += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if seen["forwards"] > 8 and hidden.shape[0] > 1:
            fired.write_text("1")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB (injected on rank 1)")
        return None

    torch.nn.modules.module.register_module_forward_hook(_oom)
"""


@pytest.mark.e2e
def test_out_of_memory_on_one_rank_relaunches_the_group_with_split_micro_batches(
    tiny_model, small_dataset, tmp_path, monkeypatch, reference
):
    """A real torch.OutOfMemoryError raised inside rank 1's decoder forward (a module hook installed by
    a sitecustomize on the ranks' PYTHONPATH), once."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(INJECT_OOM)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OOM_MARKER", str(tmp_path / "oom-fired"))
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    result = run_job(job(tiny_model, small_dataset, "oom", 2), settings=settings)
    assert (tmp_path / "oom-fired").exists(), "the injected error never fired"
    assert result["status"] == "completed", result
    (recovery,) = result["recoveries"]
    assert recovery["gradient_accumulation_steps"] == 2 and recovery["max_rows"] > 1
    assert "injected on rank 1" in recovery["message"]
    assert len(result["attempts"]) == 2  # the launch that ran out of memory, and the relaunch
    assert_same_curve(result, reference)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_a_data_parallel_job_on_two_gpus_matches_one(tiny_model, small_dataset, tmp_path):
    """NCCL, NF4 on each rank's own card (virtual local ranks), paged 8-bit AdamW, Liger when installed."""
    two_gpus()
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "REQUIRE_CUDA": "1"})
    one = run_job(job(tiny_model, small_dataset, "gpu-one", 1), settings=settings)
    two = run_job(job(tiny_model, small_dataset, "gpu-two", 2), settings=settings)
    assert one["status"] == "completed" and two["status"] == "completed", (one, two)
    assert two["gpu"].startswith("2x ")
    ref, got = losses(one), losses(two)
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], abs=5e-3), step


# ----------------------------------------------------------------------------- FSDP-QLoRA jobs
# The same job with the NF4 model sharded across the two ranks (`distributed.mode: fsdp`): the
# same per-step losses and held-out losses as one process (the same tolerance: gloo's sums of the
# LoRA gradients' shards), the adapter in the same files, checkpoints that move between modes.


def report_settings(result: dict) -> dict:
    return json.loads(Path(result["report"]["json"]).read_text())["settings"]


def adapter_tensors(result: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(result["adapter"]["path"]) / "adapter_model.safetensors")


@pytest.mark.e2e
def test_a_sharded_job_trains_the_same_steps_as_one_process(tiny_model, small_dataset, tmp_path, reference):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    replies = {"num_samples": 1, "num_scenarios": 1}  # generation (base and adapted) on the sharded model
    job_input = job(tiny_model, small_dataset, "sharded", 2, "fsdp")
    result = run_job({**job_input, "evaluation": {**job_input["evaluation"], **replies}}, settings=settings)
    assert result["status"] == "completed", result
    assert report_settings(result)["sharded_over"] == 2 and result["gpu"] == "2x cpu"
    assert_same_curve(result, reference)
    assert result["metrics"]["eval_loss_before"] == pytest.approx(
        reference["metrics"]["eval_loss_before"], abs=TOLERANCE
    )
    assert not rank_processes(tmp_path)
    # the base model's greedy reply, token by token through the relayed forwards, is one process's
    whole_input = job(tiny_model, small_dataset, "whole", 1)
    whole = run_job(
        {**whole_input, "evaluation": {**whole_input["evaluation"], **replies}}, settings=settings
    )
    (sample,) = json.loads(Path(result["report"]["json"]).read_text())["samples"]
    (whole_sample,) = json.loads(Path(whole["report"]["json"]).read_text())["samples"]
    assert sample["base"] and sample["adapted"] and sample["base"] == whole_sample["base"]
    # the adapter, gathered from the shards, is the one-process adapter: same names, shapes, and weights
    got, want = adapter_tensors(result), adapter_tensors(reference)
    assert sorted(got) == sorted(want) and len(got) == 28
    for name, tensor in got.items():
        assert tensor.shape == want[name].shape and tensor.dtype == want[name].dtype, name
        assert torch.allclose(tensor.float(), want[name].float(), atol=2e-3), name
    assert any(float(t.float().abs().max()) > 0 for n, t in got.items() if "lora_B" in n)  # it trained
    # checkpoints written from the shards: the one-process layout, optimizer included, marked complete
    markers = list((tmp_path / "jobs" / "sharded" / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    assert markers
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(
        json.loads(markers[0].read_text())["files"]
    )


@pytest.mark.e2e
def test_cancel_stops_a_sharded_job_and_one_process_resumes_it_on_the_same_curve(
    tiny_model, small_dataset, tmp_path, reference
):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    cancel_at_first_checkpoint(job(tiny_model, small_dataset, "unsharded", 2, "fsdp"), settings)
    assert not rank_processes(tmp_path), "a rank outlived the cancelled job"
    resumed = run_job(job(tiny_model, small_dataset, "unsharded", 1), settings=settings)
    assert resumed["status"] == "completed", resumed
    assert resumed["resumed_from_step"] is not None
    assert_same_curve(resumed, reference)


@pytest.mark.e2e
def test_a_one_process_checkpoint_resumes_sharded(tiny_model, small_dataset, tmp_path, reference):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    cancel_at_first_checkpoint(job(tiny_model, small_dataset, "sharded-later", 1), settings)
    resumed = run_job(job(tiny_model, small_dataset, "sharded-later", 2, "fsdp"), settings=settings)
    assert resumed["status"] == "completed", resumed
    assert resumed["resumed_from_step"] is not None and report_settings(resumed)["sharded_over"] == 2
    assert_same_curve(resumed, reference)


@pytest.mark.gpu
def test_a_sharded_job_on_two_gpus_matches_one(tiny_model, small_dataset, tmp_path):
    """FSDP-QLoRA on NCCL (NF4 stored in bf16, sharded; LoRA weights and AdamW state sharded) against
    one GPU with the same optimizer; NCCL's reductions and the CUDA NF4 kernels: 5e-3."""
    two_gpus()
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "REQUIRE_CUDA": "1"})

    def adamw(job_input: dict) -> dict:
        return {**job_input, "training": {**job_input["training"], "optimizer": "adamw_torch"}}

    one = run_job(adamw(job(tiny_model, small_dataset, "gpu-whole", 1)), settings=settings)
    two = run_job(adamw(job(tiny_model, small_dataset, "gpu-sharded", 2, "fsdp")), settings=settings)
    assert one["status"] == "completed" and two["status"] == "completed", (one, two)
    assert report_settings(two)["sharded_over"] == 2
    ref, got = losses(one), losses(two)
    assert sorted(got) == sorted(ref)
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], abs=5e-3), step
    assert two["metrics"]["eval_loss_after"] == pytest.approx(one["metrics"]["eval_loss_after"], abs=5e-3)
