"""`python -m lora_worker submit|status|cancel|chat|list`: the dashboard's calls, from a terminal.

Against RunPod (`--endpoint-id ID`, or `RUNPOD_ENDPOINT_ID`; the key from `RUNPOD_API_KEY`) or a local
endpoint (`--url http://127.0.0.1:8000/v2/local`). `submit --wait` polls `/status` and draws the job's
progress on stderr, then prints the output JSON on stdout. `chat` sends a `generate` job (an adapter's
replies, optionally beside the base model's) and prints the replies; `list` sends a `list` job and
prints the adapters on the volume; both wait for the answer (`--json` prints it as JSON).

Exit codes: 0 COMPLETED, 1 FAILED, 2 CANCELLED or TIMED_OUT, 3 a client or API error (one line on
stderr), 130 interrupted while waiting (the job keeps running).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import requests

from lora_worker.cli import invocation
from lora_worker.runtime.net import is_loopback
from lora_worker.runtime.spec import Hyperparameters, JobSpec
from lora_worker.tools.client_tasks import (
    ChatInputError,
    add_chat_parser,
    add_list_parser,
    build_generate_input,
    local_path,
    print_adapters,
    print_replies,
)

RUNPOD_API = "https://api.runpod.ai/v2"
FINAL_EXIT = {"COMPLETED": 0, "FAILED": 1, "CANCELLED": 2, "TIMED_OUT": 2}
EXIT_CLIENT_ERROR = 3
EXIT_INTERRUPTED = 130
# While waiting, transient API errors (connection drops, 5xx, 429) are retried for this long (seconds).
TRANSIENT_BUDGET_S = 60.0

# flag dest -> hyperparameters key in the job input
HYPERPARAMETER_FLAGS = {
    "epochs": "num_epochs",
    "lr": "learning_rate",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "max_seq_length": "max_seq_length",
    "batch_size": "batch_size",
    "grad_accum": "gradient_accumulation_steps",
}


class ClientError(Exception):
    """A problem worth one line on stderr; `transient` ones are retried while waiting."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class EndpointClient:
    """The public queue API of one endpoint: run, status, cancel, health."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 30.0):
        self.base = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def submit(self, job_input: dict, *, webhook: str | None = None) -> dict:
        body: dict[str, Any] = {"input": job_input, "policy": job_policy(job_input)}
        if webhook:
            body["webhook"] = webhook
        return self._call("POST", "run", body)

    def status(self, job_id: str) -> dict:
        return self._call("GET", f"status/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"cancel/{job_id}")

    def health(self) -> dict:
        return self._call("GET", "health")

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.5,
        on_status: Callable[[dict], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """Poll /status until the job is final; calls on_status with every status seen."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failing_since: float | None = None
        while True:
            try:
                st = self.status(job_id)
                failing_since = None
            except ClientError as err:
                now = time.monotonic()
                failing_since = failing_since or now
                if not err.transient or now - failing_since > TRANSIENT_BUDGET_S:
                    raise
                time.sleep(poll_s)
                continue
            if on_status is not None:
                on_status(st)
            if st.get("status") in FINAL_EXIT:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {job_id} is still {st.get('status')} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def _call(self, method: str, path: str, body: Any = None) -> dict:
        url = f"{self.base}/{path}"
        try:
            r = self.session.request(method, url, json=body, timeout=self.timeout_s)
        except requests.RequestException as err:
            raise ClientError(f"cannot reach {self.base}: {type(err).__name__}", transient=True) from None
        if r.status_code in (401, 403):
            raise ClientError(f"HTTP {r.status_code} from {url}: check RUNPOD_API_KEY")
        if r.status_code == 404:
            raise ClientError(f"HTTP 404 from {url}: {_error_text(r) or 'no such endpoint or job'}")
        if r.status_code == 429 or r.status_code >= 500:
            raise ClientError(f"HTTP {r.status_code} from {url}: {_error_text(r)}", transient=True)
        if not r.ok:
            raise ClientError(f"HTTP {r.status_code} from {url}: {_error_text(r)}")
        try:
            data = r.json()
        except ValueError:
            raise ClientError(f"{url} answered {r.status_code} with a body that is not JSON") from None
        if not isinstance(data, dict):
            raise ClientError(f"{url} answered with JSON that is not an object")
        return data


def _error_text(r: requests.Response) -> str:
    try:
        body = r.json()
        if isinstance(body, dict):
            text = body.get("error") or body.get("message") or json.dumps(body)
        else:
            text = str(body)
    except ValueError:
        text = r.text
    return " ".join(str(text).split())[:300]


# ---------------------------------------------------------------------------------- job input


def job_policy(job_input: dict) -> dict:
    """RunPod's per-job policy, sized to the job's own time limit.

    A job stops itself with a checkpoint at max_duration_hours; RunPod may run it one hour longer
    (loading, evaluation, upload) and keep it for two days in all, queue time included (RunPod's
    default lifetime is 24 h, which a day-long training job would exceed). Milliseconds.
    """
    hours = float(job_input.get("max_duration_hours") or 24.0) if isinstance(job_input, dict) else 24.0
    return {"executionTimeout": int((hours + 1) * 3_600_000), "ttl": int(max(48.0, hours + 24) * 3_600_000)}


def build_input(a: argparse.Namespace, *, local: bool) -> dict:
    """The job input: --input-json (either {"input": {...}} or the input itself), then the flags on top."""
    job: dict[str, Any] = {}
    if a.input_json:
        try:
            raw = json.loads(Path(a.input_json).read_text())
        except (OSError, ValueError) as err:
            raise ClientError(f"--input-json {a.input_json}: {err}") from None
        raw = raw.get("input", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict):
            raise ClientError(f"--input-json {a.input_json}: the input must be a JSON object")
        job = raw
    if a.dataset:
        job.pop("dataset_url", None)
        job.pop("dataset_path", None)
        if a.dataset.startswith(("https://", "http://")):
            job["dataset_url"] = a.dataset
        else:
            job["dataset_path"] = local_path(a.dataset, local)
    if a.base_model:
        job["base_model"] = local_path(a.base_model, local)
    hp = {key: getattr(a, dest) for dest, key in HYPERPARAMETER_FLAGS.items() if getattr(a, dest) is not None}
    if hp:
        job["hyperparameters"] = {**(job.get("hyperparameters") or {}), **hp}
    if a.job_id:
        job["job_id"] = a.job_id
    if a.webhook_url:
        job["webhook_url"] = a.webhook_url
    if not (job.get("dataset_url") or job.get("dataset_path")):
        raise ClientError("no dataset: give --dataset PATH_OR_URL (or an --input-json that names one)")
    return job


# ---------------------------------------------------------------------------------- progress line


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(max(0, seconds))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(st: dict, width: int = 20) -> str:
    """One line for a /status body: stage, step/total, bar, percent, loss, ETA, cost."""
    status = st.get("status", "?")
    if status == "IN_QUEUE":
        retried = f", retry {st['retries']}" if st.get("retries") else ""
        return f"IN_QUEUE  waiting for a worker{retried}"
    ev = st.get("output") if isinstance(st.get("output"), dict) else {}
    if status == "IN_PROGRESS" and not ev:
        return "IN_PROGRESS  starting (no progress reported yet)"
    stage = ev.get("status", status.lower())
    step, total = ev.get("step") or 0, ev.get("total_steps") or 0
    if not total and status == "IN_PROGRESS" and ev.get("message"):  # no steps to count: say what it does
        cost = f"  ${ev['cost_usd']:.4f}" if ev.get("cost_usd") is not None else ""
        return f"{stage:<13}  {ev['message']}{cost}"
    pct = float(ev.get("percent") or (100.0 * step / total if total else 0.0))
    if status == "COMPLETED":
        pct = 100.0
    filled = round(width * min(pct, 100.0) / 100)
    parts = [
        f"{stage:<13}",
        f"step {step}/{total or '?'}",
        f"[{'#' * filled}{'.' * (width - filled)}]",
        f"{pct:5.1f}%",
    ]
    loss = (ev.get("metrics") or {}).get("loss")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if stage == "training" and ev.get("eta_seconds") is not None:
        parts.append(f"ETA {_duration(ev['eta_seconds'])}")
    if ev.get("cost_usd") is not None:
        parts.append(f"${ev['cost_usd']:.4f}")
    return "  ".join(parts)


class ProgressView:
    """Draws progress on a stream: one line rewritten with \\r on a TTY, else a new line on change."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty()
        self._last_key: Any = None
        self._width = 0

    def __call__(self, st: dict) -> None:
        if st.get("status") in FINAL_EXIT:
            return  # the summary line after the wait says how it ended
        line = progress_line(st)
        if self.tty:
            pad = max(0, self._width - len(line))
            self.out.write("\r" + line + " " * pad)
            self._width = len(line)
            self.out.flush()
            return
        ev = st.get("output") if isinstance(st.get("output"), dict) else {}
        key = (
            st.get("status"),
            ev.get("status"),
            ev.get("step"),
            ev.get("message") if not ev.get("total_steps") else None,
        )
        if key != self._last_key:
            self._last_key = key
            print(line, file=self.out, flush=True)

    def end(self) -> None:
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()


# ---------------------------------------------------------------------------------- commands


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the default is "not given" (None or False):
    those flags leave the job input alone, and their help says what the job then uses."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


SUBMIT_DESCRIPTION = """\
Submit one training job to an endpoint: the job input comes from --input-json and/or the flags
below (flags override the file), is sent to the endpoint's /run with a per-job RunPod policy sized
to max_duration_hours, and the accepted job's id is printed. With --wait, progress is drawn on
stderr until the job ends, then its output JSON is printed on stdout and the exit code says how it
ended (0 completed, 1 failed, 2 cancelled or timed out, 3 a client or API error).
"""


def _hyperparameter_help(key: str) -> str:
    field = Hyperparameters.model_fields[key]
    return f"hyperparameters.{key}: {field.description} (job default: {field.default})"


def _endpoint_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--url", help="API base of a local endpoint, e.g. http://127.0.0.1:8000/v2/local (instead of RunPod)"
    )
    sp.add_argument(
        "--endpoint-id",
        default=os.environ.get("RUNPOD_ENDPOINT_ID"),
        help="RunPod endpoint id, from $RUNPOD_ENDPOINT_ID when set; the API key comes from $RUNPOD_API_KEY",
    )


def _submit_parser(sub) -> None:
    s = sub.add_parser(
        "submit",
        help="submit a training job",
        description=SUBMIT_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    _endpoint_args(s)
    s.add_argument("--dataset", help="dataset: an https URL (sent as dataset_url) or a path (dataset_path)")
    base_default = JobSpec.model_fields["base_model"].default
    s.add_argument(
        "--base-model", help=f"Hugging Face repo id or a model directory (job default: {base_default})"
    )
    for flag, dest, kind in (
        ("--epochs", "epochs", int),
        ("--lr", "lr", float),
        ("--lora-r", "lora_r", int),
        ("--lora-alpha", "lora_alpha", int),
        ("--max-seq-length", "max_seq_length", int),
        ("--batch-size", "batch_size", int),
        ("--grad-accum", "grad_accum", int),
    ):
        s.add_argument(flag, dest=dest, type=kind, help=_hyperparameter_help(HYPERPARAMETER_FLAGS[dest]))
    s.add_argument("--job-id", help="names jobs/<job_id>/ on the volume; resubmit the same id to resume")
    s.add_argument("--webhook-url", help="signed progress webhooks go here (the worker needs WEBHOOK_SECRET)")
    s.add_argument("--input-json", help="a JSON file with the full input; the flags above override it")
    s.add_argument(
        "--wait", action="store_true", help="follow progress, print the output, exit with its status"
    )
    s.add_argument("--poll-s", type=float, default=1.5, help="seconds between /status polls with --wait")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    _submit_parser(sub)
    add_chat_parser(sub, _endpoint_args, _HelpFormatter)
    add_list_parser(sub, _endpoint_args, _HelpFormatter)
    for name, help_ in (("status", "print a job's status JSON"), ("cancel", "cancel a job")):
        c = sub.add_parser(
            name, help=help_, description=f"{help_[0].upper()}{help_[1:]}.", formatter_class=_HelpFormatter
        )
        _endpoint_args(c)
        c.add_argument("job_id", help="the id /run returned (or submit printed)")
    return p


def _client(a: argparse.Namespace) -> tuple[EndpointClient, bool]:
    key = (os.environ.get("RUNPOD_API_KEY") or "").strip() or None
    if a.url:
        return EndpointClient(a.url, key), is_loopback(urlsplit(a.url).hostname)
    if not a.endpoint_id:
        raise ClientError("no endpoint: give --url (local) or --endpoint-id (or set RUNPOD_ENDPOINT_ID)")
    if not key:
        raise ClientError("RUNPOD_API_KEY is not set; RunPod's API needs it")
    return EndpointClient(f"{RUNPOD_API}/{a.endpoint_id}", key), False


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str), flush=True)


def _finish(st: dict, err: TextIO) -> int:
    status = st.get("status", "?")
    if status == "COMPLETED":
        out = st.get("output") or {}
        report = (out.get("report") or {}).get("markdown") if isinstance(out, dict) else None
        secs = (st.get("executionTime") or 0) / 1000
        print(f"COMPLETED in {_duration(secs)}" + (f"; report: {report}" if report else ""), file=err)
        _print_json(out)
    else:
        out = st.get("output") if isinstance(st.get("output"), dict) else {}
        detail = str(st.get("error") or out.get("error_message") or out.get("message") or "")
        detail = " ".join(detail.split())  # one line, even for a multi-line list of input problems
        print(f"{status}" + (f": {detail[:500]}" if detail else ""), file=err)
        _print_json(st)
    return FINAL_EXIT.get(status, EXIT_CLIENT_ERROR)


def _ask(client: EndpointClient, job_input: dict, a: argparse.Namespace, err: TextIO) -> int:
    """Submit a chat or list job, wait with progress on stderr, print its answer."""
    accepted = client.submit(job_input)
    job_id = accepted.get("id")
    if not job_id:
        raise ClientError(f"the endpoint accepted the job but returned no id: {accepted}")
    view = ProgressView(err)
    try:
        st = client.wait(job_id, poll_s=a.poll_s, on_status=view)
    except KeyboardInterrupt:
        view.end()
        print(f"\nstopped waiting; job {job_id} keeps running", file=err)
        return EXIT_INTERRUPTED
    view.end()
    out = st.get("output") if isinstance(st.get("output"), dict) else {}
    if st.get("status") != "COMPLETED" or a.json:
        return _finish(st, err)
    (print_replies if a.command == "chat" else print_adapters)(out, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        a = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on a usage error, which here would mean CANCELLED
        return EXIT_CLIENT_ERROR if e.code else 0
    err = sys.stderr
    job_id = None
    try:
        client, local = _client(a)
        if a.command == "status":
            _print_json(client.status(a.job_id))
            return 0
        if a.command == "cancel":
            _print_json(client.cancel(a.job_id))
            return 0
        if a.command in ("chat", "list"):
            try:
                job_input = (
                    build_generate_input(a, local=local)
                    if a.command == "chat"
                    else {"task": "list", **({"limit": a.limit} if a.limit is not None else {})}
                )
            except ChatInputError as e:
                raise ClientError(str(e)) from None
            return _ask(client, job_input, a, err)
        accepted = client.submit(build_input(a, local=local))
        job_id = accepted.get("id")
        if not job_id:
            raise ClientError(f"the endpoint accepted the job but returned no id: {accepted}")
        if not a.wait:
            _print_json(accepted)
            return 0
        print(f"job {job_id} submitted", file=err, flush=True)
        view = ProgressView(err)
        try:
            st = client.wait(job_id, poll_s=a.poll_s, on_status=view)
        finally:
            view.end()
        return _finish(st, err)
    except ClientError as e:
        print(f"error: {e}", file=err)
        return EXIT_CLIENT_ERROR
    except KeyboardInterrupt:
        if job_id:
            print(
                f"\nstopped waiting; job {job_id} keeps running (status: {invocation()} status {job_id})",
                file=err,
            )
        return EXIT_INTERRUPTED
