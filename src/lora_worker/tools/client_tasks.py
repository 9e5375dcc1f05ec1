"""The terminal client's `chat` and `list`: their arguments, the `generate` job input they send, and
how they print the answer (replies beside the base model's; the adapters as a table)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


class ChatInputError(ValueError):
    """The chat flags do not make a job input; the message says what to give."""


def local_path(value: str, local: bool) -> str:
    # A local endpoint's worker shares this machine but maybe not this directory: send what exists here
    # as an absolute path. For RunPod a path means the network volume, so it goes as written.
    p = Path(value).expanduser()
    return str(p.absolute()) if local and not p.is_absolute() and p.exists() else value


CHAT_DESCRIPTION = """\
Talk to a trained adapter: send a `generate` job with one conversation per --message (each after the
--system prompt, if given) or the conversations of --messages-json, wait for it, and print each reply
(with --compare-base, the base model's reply too). Loading a 70B base takes minutes; progress is drawn
on stderr meanwhile. Exit codes as for submit --wait.
"""

LIST_DESCRIPTION = """\
List the trained adapters on the endpoint's volume (a `list` job): job id, when it was trained, base
model, dataset, verdict and held-out loss before -> after, newest first.
"""


def add_chat_parser(sub, endpoint_args: Callable, formatter: type) -> None:
    s = sub.add_parser(
        "chat", help="talk to a trained adapter", description=CHAT_DESCRIPTION, formatter_class=formatter
    )
    endpoint_args(s)
    s.add_argument(
        "--adapter",
        required=True,
        help="a training job's id, an adapter folder, or the https URL of its archive",
    )
    s.add_argument("--message", action="append", help="a user message; each one is its own conversation")
    s.add_argument("--system", help="a system prompt put before every --message")
    s.add_argument(
        "--messages-json", help="a JSON file: a list of conversations, each a list of {role, content}"
    )
    s.add_argument("--max-new-tokens", type=int, help="longest reply in tokens (job default: 256)")
    s.add_argument("--temperature", type=float, help="0 is greedy (job default); above 0 samples")
    s.add_argument("--compare-base", action="store_true", help="also show the base model's reply")
    s.add_argument("--adapter-sha256", help="expected SHA-256 of the archive when --adapter is a URL")
    s.add_argument("--json", action="store_true", help="print the job's output JSON instead of the replies")
    s.add_argument("--poll-s", type=float, default=1.5, help="seconds between /status polls")


def add_list_parser(sub, endpoint_args: Callable, formatter: type) -> None:
    s = sub.add_parser(
        "list", help="list the trained adapters", description=LIST_DESCRIPTION, formatter_class=formatter
    )
    endpoint_args(s)
    s.add_argument("--limit", type=int, help="at most this many adapters (job default: 200)")
    s.add_argument("--json", action="store_true", help="print the job's output JSON instead of a table")
    s.add_argument("--poll-s", type=float, default=1.5, help="seconds between /status polls")


def build_generate_input(a: argparse.Namespace, *, local: bool) -> dict:
    """The `generate` job input from the chat flags."""
    conversations: list[list[dict]] = []
    if a.messages_json:
        try:
            conversations = json.loads(Path(a.messages_json).read_text())
        except (OSError, ValueError) as err:
            raise ChatInputError(f"--messages-json {a.messages_json}: {err}") from None
        if not isinstance(conversations, list):
            raise ChatInputError(f"--messages-json {a.messages_json}: must be a list of conversations")
    system = [{"role": "system", "content": a.system}] if a.system else []
    conversations += [[*system, {"role": "user", "content": m}] for m in a.message or []]
    if not conversations:
        raise ChatInputError("nothing to say: give --message TEXT (repeatable) or --messages-json FILE")
    adapter = a.adapter if a.adapter.startswith(("https://", "http://")) else local_path(a.adapter, local)
    job: dict[str, Any] = {"task": "generate", "adapter": adapter, "messages": conversations}
    for key in ("max_new_tokens", "temperature", "adapter_sha256"):
        if getattr(a, key) is not None:
            job[key] = getattr(a, key)
    if a.compare_base:
        job["compare_base"] = True
    return job


def print_replies(out: dict, stream: TextIO) -> None:
    """Each conversation's last user message, the adapter's reply and, when asked, the base model's."""
    ref = out.get("adapter") or {}
    print(f"adapter {ref.get('job_id') or ref.get('path')} on {ref.get('base_model')}", file=stream)
    for r in out.get("replies") or []:
        print(f"\n[{r['index'] + 1}] user: {r['prompt']}", file=stream)
        for side in ("adapted", "base"):
            reply = r.get(side)
            if reply:
                cut = " [cut at max_new_tokens]" if reply["finish_reason"] == "length" else ""
                label = "adapter" if side == "adapted" else "base"
                print(
                    f"{label:>7}: {reply['text']}{cut}  ({reply['new_tokens']} tokens, {reply['seconds']:.1f} s)",
                    file=stream,
                )
    for w in out.get("warnings") or []:
        print(f"warning: {w}", file=stream)
    stream.flush()


def _loss(metrics: dict) -> str:
    b, a = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    return f"{b:.4f} -> {a:.4f}" if isinstance(b, int | float) and isinstance(a, int | float) else "-"


def print_adapters(out: dict, stream: TextIO) -> None:
    """The adapters as a table, one line each."""
    rows = [("JOB", "TRAINED", "BASE", "DATASET", "VERDICT", "HELD-OUT LOSS", "ON VOLUME")]
    for e in out.get("adapters") or []:
        d = e.get("dataset") or {}
        dataset = "@".join(str(x) for x in (d.get("name"), d.get("version")) if x) or "-"
        rows.append((
            e["job_id"], (e.get("trained_at") or "-")[:16], str(e.get("base_model") or "-"), dataset,
            str(e.get("verdict") or "-"), _loss(e.get("metrics") or {}), "yes" if e.get("adapter_present") else "no",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=stream)
    if not out.get("adapters"):
        print("(no trained adapters on the volume)", file=stream)
    for s in out.get("skipped") or []:
        print(f"skipped: {s}", file=stream)
    stream.flush()
