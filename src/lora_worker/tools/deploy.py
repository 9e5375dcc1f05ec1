"""`python -m lora_worker deploy`: create or update the RunPod template and scale-to-zero endpoint.

Talks to RunPod's REST API (https://rest.runpod.io/v1, `Authorization: Bearer $RUNPOD_API_KEY`):

    GET   /templates?includeEndpointBoundTemplates=true    find the template by name
    POST  /templates            | PATCH /templates/{id}    create it, or update it in place
    GET   /endpoints                                       find the endpoint by name
    POST  /endpoints            | PATCH /endpoints/{id}    create it, or update it in place

Field names are the REST API's (its OpenAPI `TemplateCreateInput` / `EndpointCreateInput`), which
differ from the GraphQL names in the runpod SDK (`runpod/api/mutations/endpoints.py`):

    GraphQL (SDK)                 REST (used here)
    gpuIds: "AMPERE_80,..."       gpuTypeIds: ["NVIDIA H100 80GB HBM3", ...]  (ordered preference)
    flashBootType: FLASHBOOT      flashboot: true
    env: [{key, value}]           env: {KEY: value}
    (not in the SDK mutation)     executionTimeoutMs
    idleTimeout, workersMin, workersMax, networkVolumeId, scalerType, scalerValue: same names

Running it twice is safe: the template (names are unique per account) and the endpoint are
looked up by name and PATCHed, never duplicated. `--dry-run` prints the requests and sends none.
Secrets (`--secret-env NAME`) are read from the local environment and never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from lora_worker.runtime.net import scrub

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
# One GPU per worker: the job trains on one card (a 4-bit 70B fits on an 80 GB GPU).
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
# RunPod's endpoint-settings page gives 24 h as the maximum execution timeout (longer per job via
# the /run request's policy); the REST schema states no maximum. Unverified which one the API
# enforces, so a 400 on a longer timeout gets a hint rather than a silent change.
_DOCUMENTED_MAX_TIMEOUT_MS = 24 * 3600 * 1000
# Most jobs running at once; each is one GPU (~$4/h on H100), so this caps the spend rate.
DEFAULT_WORKERS_MAX = 2
# Container disk in GB. With a network volume the base model (~141 GB of bf16 safetensors for
# 70B) lives on the volume and the container needs only scratch space; without one, the Hugging
# Face cache falls back to the container disk and must hold the whole model.
DEFAULT_DISK_GB_WITH_VOLUME = 50
DEFAULT_DISK_GB_WITHOUT_VOLUME = 200

# RunPod names FlashBoot endpoints "<name> -fb" in some places (console, GraphQL era); treat
# that suffix as the same name so a re-deploy updates instead of duplicating.
_FLASHBOOT_SUFFIX = re.compile(r"\s*-fb$")
# Env names that hold credentials: masked in --dry-run output even when passed with --env.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|_KEY$)", re.IGNORECASE)
# A reference to a secret stored in RunPod ({{ RUNPOD_SECRET_name }}): not itself a secret.
_RUNPOD_SECRET_REF = re.compile(r"^\{\{\s*RUNPOD_SECRET_[A-Za-z0-9_]+\s*\}\}$")
# Seconds: connect, read. The REST calls are small; a slow answer is a problem worth reporting.
_HTTP_TIMEOUT_S = (10, 60)
MASK = "***"


class DeployError(Exception):
    """A problem reported to the user as one line, exit code 1."""


@dataclass
class Request:
    method: str
    url: str
    body: dict[str, Any] | None = None


@dataclass
class Config:
    name: str
    image: str
    template_name: str
    network_volume_id: str | None
    gpu_type_ids: list[str]
    gpu_count: int
    allowed_cuda_versions: list[str]
    idle_timeout_s: int
    execution_timeout_ms: int
    workers_max: int
    container_disk_gb: int
    flashboot: bool
    env: dict[str, str]
    secret_values: list[str] = field(default_factory=list, repr=False)
    masked_keys: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------------------- bodies


def template_body(cfg: Config, *, create: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": cfg.template_name,
        "imageName": cfg.image,
        "containerDiskInGb": cfg.container_disk_gb,
        # Serverless workers get storage from the network volume, never a per-worker volume.
        "volumeInGb": 0,
        "env": dict(cfg.env),
    }
    if create:
        # Only settable at creation (not part of the REST TemplateUpdateInput).
        body["isServerless"] = True
        body["category"] = "NVIDIA"
    return body


def endpoint_body(cfg: Config, template_id: str, *, create: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": cfg.name,
        "templateId": template_id,
        "gpuTypeIds": list(cfg.gpu_type_ids),
        "gpuCount": cfg.gpu_count,
        "allowedCudaVersions": list(cfg.allowed_cuda_versions),
        "workersMin": 0,  # scale to zero: no job, no bill
        "workersMax": cfg.workers_max,
        "idleTimeout": cfg.idle_timeout_s,
        "flashboot": cfg.flashboot,
        "executionTimeoutMs": cfg.execution_timeout_ms,
        # Add a worker once a job has waited this many seconds; a cold start takes far longer.
        "scalerType": "QUEUE_DELAY",
        "scalerValue": 4,
    }
    if cfg.network_volume_id:
        body["networkVolumeId"] = cfg.network_volume_id
    if create:
        body["computeType"] = "GPU"  # only settable at creation
    return body


# ---------------------------------------------------------------------------------------- output


def masked(cfg: Config, body: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of a request body with secret env values replaced by `***`."""
    if body is None or "env" not in body:
        return body
    env = {k: (MASK if k in cfg.masked_keys else v) for k, v in body["env"].items()}
    return {**body, "env": env}


def print_request(cfg: Config, req: Request, note: str = "") -> None:
    print(f"{req.method} {req.url}{note}")
    if req.body is not None:
        print(json.dumps(masked(cfg, req.body), indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------ HTTP


class RestClient:
    def __init__(self, api_url: str, api_key: str, cfg: Config):
        self.api_url = api_url.rstrip("/")
        self.cfg = cfg
        self.session = requests.Session()
        self.session.headers.update(
            {
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            }
        )
        cfg.secret_values.append(api_key)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.api_url}{path}"
        try:
            resp = self.session.request(method, url, json=body, timeout=_HTTP_TIMEOUT_S)
        except requests.Timeout as exc:
            raise DeployError(
                f"RunPod API timed out on {method} {url} (limit {_HTTP_TIMEOUT_S[1]} s)"
            ) from exc
        except requests.ConnectionError as exc:
            raise DeployError(
                f"cannot reach the RunPod API on {method} {url}: {_connection_reason(exc)}"
            ) from exc
        if not resp.ok:
            raise DeployError(
                scrub(
                    f"RunPod API error: HTTP {resp.status_code} on {method} {url}: {_api_message(resp)}",
                    *self.cfg.secret_values,
                )
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise DeployError(
                f"RunPod API returned non-JSON on {method} {url} (HTTP {resp.status_code}): {resp.text[:200]!r}"
            ) from exc


def _api_message(resp: requests.Response) -> str:
    """The API's own explanation, from a JSON body's error/message field, else the raw text."""
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail", "errors"):
            if data.get(key):
                value = data[key]
                return value if isinstance(value, str) else json.dumps(value)
    if isinstance(data, list) and data:
        return json.dumps(data)
    text = " ".join(resp.text.split())
    return text[:300] if text else (resp.reason or "no message")


def _connection_reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if found:
        return found.group(0).strip()
    return "connection failed" if not text else text[:200]


# ------------------------------------------------------------------------------------------ flow


def _same_name(found: Any, wanted: str) -> bool:
    return isinstance(found, str) and _FLASHBOOT_SUFFIX.sub("", found.strip()) == wanted


def _as_list(data: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise DeployError(f"RunPod API returned {type(data).__name__} for the {what} list, expected a list")
    return [item for item in data if isinstance(item, dict)]


def _id_of(data: Any, what: str) -> str:
    if not isinstance(data, dict) or not data.get("id"):
        raise DeployError(f"RunPod API response for the {what} has no id: {str(data)[:200]}")
    return str(data["id"])


def deploy(client: RestClient, cfg: Config) -> tuple[str, str]:
    """Create or update the template, then the endpoint; returns (template_id, endpoint_id)."""
    # Templates bound to an endpoint are left out of GET /templates unless asked for; without
    # the flag a second deploy would not see its own template and try to create it again.
    templates = _as_list(client.call("GET", "/templates?includeEndpointBoundTemplates=true"), "template")
    endpoints = _as_list(client.call("GET", "/endpoints"), "endpoint")

    matches = [e for e in endpoints if _same_name(e.get("name"), cfg.name)]
    if len(matches) > 1:
        ids = ", ".join(str(e.get("id")) for e in matches)
        raise DeployError(
            f"{len(matches)} endpoints are named {cfg.name!r} ({ids}); delete the extras or pick another --name"
        )
    endpoint = matches[0] if matches else None

    template = next((t for t in templates if t.get("name") == cfg.template_name), None)
    if template is None and endpoint is not None and endpoint.get("templateId"):
        # The endpoint's own template, even if it was renamed: update what the endpoint runs.
        template = next((t for t in templates if t.get("id") == endpoint["templateId"]), None)

    if template is not None:
        template_id = str(template["id"])
        client.call("PATCH", f"/templates/{template_id}", template_body(cfg, create=False))
        print(f"updated template {cfg.template_name!r} ({template_id}): image {cfg.image}")
    else:
        template_id = _id_of(
            client.call("POST", "/templates", template_body(cfg, create=True)), "new template"
        )
        print(f"created template {cfg.template_name!r} ({template_id}): image {cfg.image}")

    try:
        if endpoint is not None:
            endpoint_id = str(endpoint["id"])
            client.call("PATCH", f"/endpoints/{endpoint_id}", endpoint_body(cfg, template_id, create=False))
            print(f"updated endpoint {cfg.name!r} ({endpoint_id})")
        else:
            endpoint_id = _id_of(
                client.call("POST", "/endpoints", endpoint_body(cfg, template_id, create=True)),
                "new endpoint",
            )
            print(f"created endpoint {cfg.name!r} ({endpoint_id})")
    except DeployError as exc:
        if "HTTP 400" in str(exc) and cfg.execution_timeout_ms > _DOCUMENTED_MAX_TIMEOUT_MS:
            raise DeployError(
                f"{exc} (RunPod's docs give 24 h as the endpoint execution-timeout maximum: retry with "
                "--execution-timeout-hours 24 and send policy.executionTimeout with each job, see docs/deploy.md)"
            ) from exc
        raise
    return template_id, endpoint_id


def dry_run(api_url: str, cfg: Config) -> None:
    base = api_url.rstrip("/")
    print("# dry run: nothing is sent. A real run sends these requests, in this order:")
    print_request(cfg, Request("GET", f"{base}/templates?includeEndpointBoundTemplates=true"))
    print_request(cfg, Request("GET", f"{base}/endpoints"))
    print_request(
        cfg,
        Request("POST", f"{base}/templates", template_body(cfg, create=True)),
        f"    (PATCH {base}/templates/{{id}} instead if template {cfg.template_name!r} exists)",
    )
    print_request(
        cfg,
        Request("POST", f"{base}/endpoints", endpoint_body(cfg, "<template id>", create=True)),
        f"    (PATCH {base}/endpoints/{{id}} instead if endpoint {cfg.name!r} exists)",
    )


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
        help=f"GPUs per worker (1-{MAX_GPU_COUNT}, default {DEFAULT_GPU_COUNT}); the job trains on one",
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
    p.add_argument(
        "--dry-run", action="store_true", help="print the requests (secrets masked) and send nothing"
    )
    p.add_argument(
        "--api-url", default=DEFAULT_API_URL, help=f"RunPod REST API base (default {DEFAULT_API_URL})"
    )
    return p


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


def build_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    name = args.name.strip()
    if not name:
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

    gpu_ids = [
        g.strip() for arg in (args.gpu_ids or DEFAULT_GPU_TYPE_IDS) for g in arg.split(",") if g.strip()
    ]
    if not gpu_ids:
        raise DeployError("--gpu-ids needs at least one GPU type")
    cuda = [
        v.strip()
        for arg in (args.allowed_cuda_versions or DEFAULT_CUDA_VERSIONS)
        for v in arg.split(",")
        if v.strip()
    ]
    _check_cuda_versions(cuda)

    env: dict[str, str] = {}
    masked_keys: set[str] = set()
    secret_values: list[str] = []
    for item in args.env:
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
    for key in args.secret_env:
        key = key.strip()
        value = environ.get(key, "")
        if not value:
            raise DeployError(f"--secret-env {key}: {key} is not set (or empty) in this shell's environment")
        env[key] = value
        masked_keys.add(key)
        secret_values.append(value)

    disk = args.container_disk_gb
    if disk is None:
        disk = DEFAULT_DISK_GB_WITH_VOLUME if args.network_volume_id else DEFAULT_DISK_GB_WITHOUT_VOLUME
    if disk < 10:
        raise DeployError(f"--container-disk-gb must be at least 10, got {disk}")

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
        container_disk_gb=disk,
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
        _, endpoint_id = deploy(RestClient(args.api_url, api_key, cfg), cfg)
    except DeployError as exc:
        message = scrub(str(exc), *cfg.secret_values) if cfg else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 1

    print(f"endpoint {endpoint_id} is ready (scales to zero; first job cold-starts a worker):")
    print(f"  submit:  POST {QUEUE_API_URL}/{endpoint_id}/run")
    print(f"  status:  GET  {QUEUE_API_URL}/{endpoint_id}/status/<job id>")
    print(f"  cancel:  POST {QUEUE_API_URL}/{endpoint_id}/cancel/<job id>")
    return 0
