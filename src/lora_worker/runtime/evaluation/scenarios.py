"""Scenarios the base and the adapted model both answer: from the studio's own JSONL file, or by
default from turns of the held-out conversations, taken across emotional arcs in turn.

The file format, one JSON object per line (blank lines skipped):

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., {"role": "user", ...}],
     "tags": {"arc": "couple_conflict", ...},      # optional: string values, for slices
     "reference": "...",                            # optional: a good reply, shown for comparison
     "id": "..."}                                   # optional: default line-<n>

A held-out conversation gives several scenarios (its target turns, each with the history before
it), so that 50 scenarios need not hold out 50 conversations of training data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data.conversation import Conversation, DatasetError, PreprocessingCancelled
from lora_worker.runtime.data.fetch import DatasetFetchError, fetch_dataset
from lora_worker.runtime.data.hooks import ShouldStop
from lora_worker.runtime.data.split import UNKNOWN
from lora_worker.runtime.evaluation.slices import SLICE_KEYS

MAX_SCENARIO_BYTES = 64 << 20  # 64 MiB: thousands of long scenarios; more is a mistake
_KEYS = {"messages", "tags", "reference", "id"}
_ROLES = ("system", "user", "assistant")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatMessage(_Frozen):
    role: Literal["system", "user", "assistant"]
    content: str


class Scenario(_Frozen):
    id: str
    messages: tuple[ChatMessage, ...] = Field(description="The conversation so far, ending with a user turn.")
    tags: dict[str, str] = Field(default_factory=dict)
    reference: str | None = Field(None, description="A reply to compare with (the dataset's, or the file's).")
    source: Literal["file", "held_out"]

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def prompt(self) -> str:
        """The last user message."""
        return self.messages[-1].content


# ----------------------------------------------------------------------------- the file


def _messages(raw: Any, where: str, problems: list[str]) -> tuple[ChatMessage, ...] | None:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        return None
    out = []
    for i, m in enumerate(raw):
        here = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            problems.append(f"{here}: must be an object with only 'role' and 'content'")
            return None
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            problems.append(f"{here}.role: must be one of {', '.join(_ROLES)}, got {role!r}")
            return None
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{here}.content: must be a non-empty string")
            return None
        if role == "system" and i != 0:
            problems.append(f"{here}: a system message may only come first")
            return None
        out.append(ChatMessage(role=role, content=content))
    if out[-1].role != "user":
        problems.append(f"{where}: messages must end with a user turn (the one the models answer)")
        return None
    return tuple(out)


def _tags(raw: Any, where: str, problems: list[str]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: tags must be an object of names to strings")
        return {}
    tags = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            problems.append(f"{where}: tags.{k} must be a string or a number, got {type(v).__name__}")
            continue
        tags[str(k)] = str(v)
    return tags


def _scenario(obj: Any, n: int, problems: list[str]) -> Scenario | None:
    where = f"line {n}"
    if not isinstance(obj, dict):
        problems.append(f"{where}: must be a JSON object with 'messages'")
        return None
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_KEYS))})")
    reference = obj.get("reference")
    if reference is not None and not isinstance(reference, str):
        problems.append(f"{where}: reference must be a string")
        reference = None
    sid = obj.get("id", f"line-{n}")
    if not isinstance(sid, str | int) or isinstance(sid, bool) or str(sid) == "":
        problems.append(f"{where}: id must be a non-empty string")
        sid = f"line-{n}"
    messages = _messages(obj.get("messages"), where, problems)
    tags = _tags(obj.get("tags"), where, problems)
    if messages is None or unknown:
        return None
    return Scenario(id=str(sid), messages=messages, tags=tags, reference=reference, source="file")


def parse_scenarios(text: str, source: str) -> list[Scenario]:
    """Every scenario of a JSONL text; DatasetError listing each problem with its line number."""
    problems: list[str] = []
    out: list[Scenario] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {n}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        scenario = _scenario(obj, n, problems)
        if scenario is not None:
            out.append(scenario)
    seen: dict[str, int] = {}
    for s in out:
        seen[s.id] = seen.get(s.id, 0) + 1
    problems += [f"id {i!r} is used by {k} scenarios; ids must be unique" for i, k in seen.items() if k > 1]
    if not out and not problems:
        problems.append("the file holds no scenario")
    if problems:
        raise DatasetError(source, problems)
    return out


def load_scenarios(
    *,
    path: str | None,
    url: str | None,
    dest_dir: Path,
    volume_dir: Path | None = None,
    should_stop: ShouldStop | None = None,
) -> list[Scenario] | None:
    """The scenarios of `evaluation.scenarios_path` or `.scenarios_url`; None when neither is set.

    Call it before training: a bad file is refused with its line numbers before any GPU time.
    Raises DatasetError naming the field (never the URL's query) or PreprocessingCancelled.
    """
    if path is None and url is None:
        return None
    field = "evaluation.scenarios_url" if url is not None else "evaluation.scenarios_path"
    try:
        fetched = fetch_dataset(
            url=url, path=path, dest_dir=dest_dir, volume_dir=volume_dir,
            max_bytes=MAX_SCENARIO_BYTES, should_stop=should_stop,
        )  # fmt: skip
    except DatasetFetchError as err:
        raise DatasetError(field, err.problems) from None
    except PreprocessingCancelled:
        raise
    try:
        text = fetched.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(field, [f"cannot read {fetched.path.name}: {err}"]) from None
    return parse_scenarios(text, f"{field} ({fetched.source})")


# ----------------------------------------------------------------------------- held-out turns


def _turns(c: Conversation) -> list[int]:
    """Indices of target turns that follow a user turn (so the prompt ends with the user)."""
    return [i for i, m in enumerate(c.messages) if m.train and i > 0 and c.messages[i - 1].role == "user"]


def held_out_scenarios(eval_conversations: Sequence[Conversation], n: int, *, seed: int) -> list[Scenario]:
    """Up to n scenarios from held-out target turns: emotional arcs take turns, within an arc the
    conversations take turns, and each conversation gives its turns in a seeded order."""
    rng = random.Random(seed)
    by_group: dict[str, list[tuple[Conversation, int]]] = {}
    for c in eval_conversations:
        by_group.setdefault(c.group, []).extend((c, t) for t in _turns(c))
    arcs: dict[str, list[str]] = {}
    for group in sorted(by_group):
        rng.shuffle(by_group[group])
        first = by_group[group][0][0] if by_group[group] else None
        arc = (first.scaffolding.emotional_arc if first and first.scaffolding else None) or UNKNOWN
        arcs.setdefault(arc, []).append(group)
    order = sorted(arcs)
    rng.shuffle(order)
    for arc in order:
        rng.shuffle(arcs[arc])
    cursor = {arc: 0 for arc in order}
    out: list[Scenario] = []
    while len(out) < n and any(by_group[g] for a in order for g in arcs[a]):
        for arc in order:
            groups = [g for g in arcs[arc] if by_group[g]]
            if not groups or len(out) >= n:
                continue
            group = groups[cursor[arc] % len(groups)]
            cursor[arc] += 1
            convo, t = by_group[group].pop(0)
            out.append(_from_turn(convo, t))
    return out


def _from_turn(c: Conversation, t: int) -> Scenario:
    tags = {k: v for k, (_, read) in SLICE_KEYS.items() if c.scaffolding and (v := read(c.scaffolding))}
    return Scenario(
        id=f"{c.id}@{t}",
        messages=tuple(ChatMessage(role=m.role, content=m.content) for m in c.messages[:t]),  # type: ignore[arg-type]
        tags=tags,
        reference=c.messages[t].content,
        source="held_out",
    )
