"""RunPod's REST API for the deploy command: the request bodies, the client, and the create-or-update flow.

Talks to https://rest.runpod.io/v1 with `Authorization: Bearer $RUNPOD_API_KEY`:

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

The template (names are unique per account) and the endpoint are looked up by name and PATCHed,
never duplicated, so running the flow twice is safe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import requests

from lora_worker.runtime.net import scrub

# RunPod's endpoint-settings page gives 24 h as the maximum execution timeout (longer per job via
# the /run request's policy); the REST schema states no maximum. Unverified which one the API
# enforces, so a 400 on a longer timeout gets a hint rather than a silent change.
_DOCUMENTED_MAX_TIMEOUT_MS = 24 * 3600 * 1000

# RunPod names FlashBoot endpoints "<name> -fb" in some places (console, GraphQL era); treat
# that suffix as the same name so a re-deploy updates instead of duplicating.
_FLASHBOOT_SUFFIX = re.compile(r"\s*-fb$")
# Seconds: connect, read. The REST calls are small; a slow answer is a problem worth reporting.
_HTTP_TIMEOUT_S = (10, 60)
MASK = "***"


class DeployError(Exception):
    """A problem reported to the user as one line, exit code 1."""


@dataclass
class Request:
    """One REST call, as --dry-run prints it."""

    method: str
    url: str
    body: dict[str, Any] | None = None


@dataclass
class Config:
    """The checked deploy settings. `secret_values` are scrubbed from error text (the client adds its
    API key); `masked_keys` are the env names printed as `***`."""

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


def create_or_update(client: RestClient, cfg: Config) -> tuple[str, str]:
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
