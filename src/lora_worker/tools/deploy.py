"""`python -m lora_worker deploy`: create or update the RunPod template and scale-to-zero endpoint.

This module is the command: its defaults, arguments and their checks. The REST calls and request
bodies are in deploy_api.py. Running it twice is safe (the template and endpoint are found by name
and updated); `--dry-run` prints the requests and sends none. Secrets (`--secret-env NAME`) are read
from the local environment and never printed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping

from lora_worker.runtime.net import scrub
from lora_worker.tools.deploy_api import Config, DeployError, RestClient, create_or_update, dry_run

DEFAULT_API_URL = "https://rest.runpod.io/v1"
QUEUE_API_URL = "https://api.runpod.ai/v2"

# Ordered preference (RunPod rents the first type with capacity): H100 SXM, PCIe and NVL all
# hold the 70B 4-bit model (~40 GB) plus activations; A100 80 GB is the fallback when no H100
# is free (same memory, roughly half the bf16 throughput, so jobs take longer but still fit).
DEFAULT_GPU_TYPE_IDS = [
    "NVIDIA H100 80GB HBM3",
    "NVIDIA H100 PCIe",
    "NVIDIA H100 NVL",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA A100 80GB PCIe",
]
# The CUDA version of the image's base (the Dockerfile's CUDA_VERSION; tests/test_dockerfile.py
# keeps the two, .runpod/*.json and this list equal). Its torch needs a host driver for this CUDA
# version or newer: a host with an older driver makes the GPU invisible, and REQUIRE_CUDA fails the job.
IMAGE_CUDA = "12.6"
# Host CUDA versions (the driver's, as nvidia-smi shows it) that RunPod's allowedCudaVersions takes,
# oldest first. Driver R565 reports 12.7 although no 12.7 toolkit exists.
RUNPOD_CUDA_VERSIONS = (
    "12.0",
    "12.1",
    "12.2",
    "12.3",
    "12.4",
    "12.5",
    "12.6",
    "12.7",
    "12.8",
    "12.9",
    "13.0",
)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def cuda_versions_from(minimum: str) -> list[str]:
    """RunPod's host CUDA versions at or above `minimum`: the hosts an image built for it runs on."""
    return [v for v in RUNPOD_CUDA_VERSIONS if _version_key(v) >= _version_key(minimum)]


DEFAULT_CUDA_VERSIONS = cuda_versions_from(IMAGE_CUDA)
# One GPU per worker by default: a 4-bit 70B fits on an 80 GB card; with more, jobs train data parallel.
DEFAULT_GPU_COUNT = 1
MAX_GPU_COUNT = 8  # the most GPUs of one type a RunPod host has

# Seconds an idle worker stays up after its job. A training job runs for hours and jobs arrive
# rarely, so a warm worker mostly burns H100 time (~$4/h); a cold start (FlashBoot on, model
# cached on the volume) costs a minute or two once per job. So: release almost at once.
DEFAULT_IDLE_TIMEOUT_S = 5
# The worker stops training at max_duration_hours=24; the extra hour covers loading the base
# model, the held-out evaluation, sample generation and uploading the adapter.
# Jobs that may run near a day should also send policy.executionTimeout/ttl (docs/deploy.md).
DEFAULT_EXECUTION_TIMEOUT_H = 25.0
# Most jobs running at once; each is one GPU (~$4/h on H100), so this caps the spend rate.
DEFAULT_WORKERS_MAX = 2
# Container disk in GB. With a network volume the base model (~141 GB of bf16 safetensors for
# 70B) lives on the volume and the container needs only scratch space; without one, the Hugging
# Face cache falls back to the container disk and must hold the whole model.
DEFAULT_DISK_GB_WITH_VOLUME = 50
DEFAULT_DISK_GB_WITHOUT_VOLUME = 200

# Env names that hold credentials: masked in --dry-run output even when passed with --env.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|_KEY$)", re.IGNORECASE)
# A reference to a secret stored in RunPod ({{ RUNPOD_SECRET_name }}): not itself a secret.
_RUNPOD_SECRET_REF = re.compile(r"^\{\{\s*RUNPOD_SECRET_[A-Za-z0-9_]+\s*\}\}$")


# ------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker deploy",
        description="Create or update the RunPod serverless template and endpoint for this worker (idempotent).",
    )
    p.add_argument("--name", required=True, help="endpoint name; the template is named NAME-template")
    p.add_argument("--image", required=True, help="container image, e.g. docker.io/you/lora-worker:0.1.0")
    p.add_argument(
        "--network-volume-id", help="network volume to mount at /runpod-volume (model cache, checkpoints)"
    )
    _add_worker_args(p)
    _add_env_args(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the requests (secrets masked) and send nothing"
    )
    p.add_argument(
        "--api-url", default=DEFAULT_API_URL, help=f"RunPod REST API base (default {DEFAULT_API_URL})"
    )
    return p


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    """The endpoint's GPUs, scaling, timeouts and disk."""
    p.add_argument(
        "--gpu-ids",
        nargs="+",
        metavar="GPU_TYPE",
        help="RunPod GPU type ids in order of preference (quote each, or comma-separate); "
        f"default: {', '.join(DEFAULT_GPU_TYPE_IDS)}",
    )
    p.add_argument(
        "--gpu-count",
        type=int,
        default=DEFAULT_GPU_COUNT,
        metavar="N",
        help=f"GPUs per worker (1-{MAX_GPU_COUNT}, default {DEFAULT_GPU_COUNT}); a job trains on all of them, "
        "data parallel (distributed.num_processes for fewer)",
    )
    p.add_argument(
        "--allowed-cuda-versions",
        nargs="+",
        metavar="VERSION",
        help=f"host driver CUDA versions to schedule on; default: the image's CUDA {IMAGE_CUDA} and newer "
        f"({' '.join(DEFAULT_CUDA_VERSIONS)})",
    )
    p.add_argument(
        "--idle-timeout",
        type=int,
        default=DEFAULT_IDLE_TIMEOUT_S,
        metavar="S",
        help=f"seconds an idle worker stays up (1-3600, default {DEFAULT_IDLE_TIMEOUT_S})",
    )
    p.add_argument(
        "--execution-timeout-hours",
        type=float,
        default=DEFAULT_EXECUTION_TIMEOUT_H,
        metavar="H",
        help=f"hours one job may run before RunPod stops it (default {DEFAULT_EXECUTION_TIMEOUT_H:g})",
    )
    p.add_argument(
        "--workers-max",
        type=int,
        default=DEFAULT_WORKERS_MAX,
        metavar="N",
        help=f"most jobs running at once, one GPU each (default {DEFAULT_WORKERS_MAX})",
    )
    p.add_argument(
        "--container-disk-gb",
        type=int,
        metavar="GB",
        help=f"container disk (default {DEFAULT_DISK_GB_WITH_VOLUME} with a network volume, "
        f"{DEFAULT_DISK_GB_WITHOUT_VOLUME} without)",
    )
    p.add_argument("--no-flashboot", dest="flashboot", action="store_false", help="turn FlashBoot off")


def _add_env_args(p: argparse.ArgumentParser) -> None:
    """The template's environment: plain values, and secrets copied from this shell."""
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="template env var (repeatable); for secrets use --secret-env",
    )
    p.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME",
        help="copy env var NAME from this shell into the template, never printing it (repeatable)",
    )


def _check_cuda_versions(versions: list[str]) -> None:
    """Refuse a malformed version; warn about hosts too old for the image's CUDA."""
    if not versions:
        raise DeployError("--allowed-cuda-versions needs at least one version")
    for v in versions:
        if v not in RUNPOD_CUDA_VERSIONS:
            raise DeployError(
                f"--allowed-cuda-versions {v}: RunPod takes one of {', '.join(RUNPOD_CUDA_VERSIONS)}"
            )
    older = [v for v in versions if v not in DEFAULT_CUDA_VERSIONS]
    if older:
        print(
            f"warning: the image is built for CUDA {IMAGE_CUDA}; on hosts with CUDA {', '.join(older)} "
            "its torch cannot use the GPU and jobs fail at once (REQUIRE_CUDA)",
            file=sys.stderr,
        )


def _check_limits(args: argparse.Namespace) -> None:
    """Refuse an empty name or image and numbers outside what RunPod accepts, naming the flag."""
    if not args.name.strip():
        raise DeployError("--name must not be empty")
    if not args.image.strip():
        raise DeployError("--image must not be empty")
    if not 1 <= args.idle_timeout <= 3600:
        raise DeployError(f"--idle-timeout must be 1-3600 seconds, got {args.idle_timeout}")
    # RunPod enforces its own ceiling (the API answers 400); this only catches typos early.
    if not 0 < args.execution_timeout_hours <= 24 * 7:
        raise DeployError(
            f"--execution-timeout-hours must be in (0, 168], got {args.execution_timeout_hours:g}"
        )
    if args.workers_max < 1:
        raise DeployError(f"--workers-max must be at least 1, got {args.workers_max}")
    if not 1 <= args.gpu_count <= MAX_GPU_COUNT:
        raise DeployError(f"--gpu-count must be 1-{MAX_GPU_COUNT}, got {args.gpu_count}")


def _split_values(given: list[str] | None, default: list[str]) -> list[str]:
    """Space- or comma-separated flag values, blanks dropped; `default` when the flag is absent."""
    return [v.strip() for arg in (given or default) for v in arg.split(",") if v.strip()]


def _template_env(
    env_args: list[str], secret_names: list[str], environ: Mapping[str, str]
) -> tuple[dict[str, str], set[str], list[str]]:
    """(env, keys masked in output, secret values to scrub from errors) from --env and --secret-env."""
    env: dict[str, str] = {}
    masked_keys: set[str] = set()
    secret_values: list[str] = []
    for item in env_args:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DeployError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
        if _SECRET_NAME.search(key) and not _RUNPOD_SECRET_REF.match(value.strip()):
            # Still sent as given, but never echoed; the value is now in shell history, though.
            masked_keys.add(key)
            if value:
                secret_values.append(value)
            print(
                f"warning: --env {key}=... puts a secret on the command line; prefer --secret-env {key} "
                f"or a RunPod secret reference ({{{{ RUNPOD_SECRET_{key.lower()} }}}})",
                file=sys.stderr,
            )
    for key in secret_names:
        key = key.strip()
        value = environ.get(key, "")
        if not value:
            raise DeployError(f"--secret-env {key}: {key} is not set (or empty) in this shell's environment")
        env[key] = value
        masked_keys.add(key)
        secret_values.append(value)
    return env, masked_keys, secret_values


def _container_disk_gb(args: argparse.Namespace) -> int:
    disk = args.container_disk_gb
    if disk is None:
        disk = DEFAULT_DISK_GB_WITH_VOLUME if args.network_volume_id else DEFAULT_DISK_GB_WITHOUT_VOLUME
    if disk < 10:
        raise DeployError(f"--container-disk-gb must be at least 10, got {disk}")
    return disk


def build_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """The checked deploy settings from parsed arguments; secrets read from `environ`."""
    _check_limits(args)
    gpu_ids = _split_values(args.gpu_ids, DEFAULT_GPU_TYPE_IDS)
    if not gpu_ids:
        raise DeployError("--gpu-ids needs at least one GPU type")
    cuda = _split_values(args.allowed_cuda_versions, DEFAULT_CUDA_VERSIONS)
    _check_cuda_versions(cuda)
    env, masked_keys, secret_values = _template_env(args.env, args.secret_env, environ)
    name = args.name.strip()
    return Config(
        name=name,
        image=args.image.strip(),
        template_name=f"{name}-template",
        network_volume_id=(args.network_volume_id or "").strip() or None,
        gpu_type_ids=gpu_ids,
        gpu_count=args.gpu_count,
        allowed_cuda_versions=cuda,
        idle_timeout_s=args.idle_timeout,
        execution_timeout_ms=round(args.execution_timeout_hours * 3600 * 1000),
        workers_max=args.workers_max,
        container_disk_gb=_container_disk_gb(args),
        flashboot=args.flashboot,
        env=env,
        secret_values=secret_values,
        masked_keys=masked_keys,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed by argparse)
        return int(exc.code or 0)

    cfg: Config | None = None
    try:
        cfg = build_config(args, os.environ)
        if not cfg.network_volume_id:
            print(
                "warning: no --network-volume-id: the 70B base model is downloaded to each worker's container "
                f"disk ({cfg.container_disk_gb} GB) on every cold start, and checkpoints do not survive the worker",
                file=sys.stderr,
            )
        if args.dry_run:
            dry_run(args.api_url, cfg)
            return 0
        api_key = os.environ.get("RUNPOD_API_KEY", "").strip()
        if not api_key:
            raise DeployError(
                "RUNPOD_API_KEY is not set: create an API key in the RunPod console (Settings > API Keys) "
                "and `export RUNPOD_API_KEY=...`, or use --dry-run"
            )
        _, endpoint_id = create_or_update(RestClient(args.api_url, api_key, cfg), cfg)
    except DeployError as exc:
        message = scrub(str(exc), *cfg.secret_values) if cfg else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 1

    print(f"endpoint {endpoint_id} is ready (scales to zero; first job cold-starts a worker):")
    print(f"  submit:  POST {QUEUE_API_URL}/{endpoint_id}/run")
    print(f"  status:  GET  {QUEUE_API_URL}/{endpoint_id}/status/<job id>")
    print(f"  cancel:  POST {QUEUE_API_URL}/{endpoint_id}/cancel/<job id>")
    return 0
