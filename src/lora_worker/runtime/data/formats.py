"""Dataset files to conversations: `brightrun-lora-v4` and `chat-jsonl`, validated with places.

Layouts:
- `brightrun-lora-v4`: `{"conversations": [{"conversation_metadata": {...}, "training_pairs": [...]}]}`
  where each pair repeats its conversation's earlier turns in `conversation_history`;
- `chat-jsonl`: one `{"messages": [{"role", "content"}, ...]}` per line (OpenAI/Together style).

Validation collects every problem with its place (conversation id and turn, or JSONL line) and
raises once, before any model is loaded.

Folding: a brightrun conversation whose pairs agree with each other (each pair's history is the
earlier pairs' inputs and targets) is trained once as one multi-turn example with loss on every
target turn, instead of once per pair, which re-processes the shared prefix again and again.
Pairs that disagree are trained pair by pair, each with its own history.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_worker.runtime.data.conversation import (
    ROLES,
    SPLIT_MARK,
    Conversation,
    DatasetError,
    LoadedDataset,
    LoadStats,
    Message,
    TurnMeta,
)
from lora_worker.runtime.data.hooks import OnProgress, ShouldStop, Ticker
from lora_worker.runtime.data.metadata import parse_file_meta, parse_scaffolding, parse_turn_meta

FORMATS = ("brightrun-lora-v4", "chat-jsonl")
MAX_CONVERSATIONS = 100_000  # far beyond a studio export (hundreds); bounds preprocessing time


@dataclass(frozen=True)
class _Pair:
    turn: int
    system: str
    history: list[dict]
    user: str
    target: str | None
    meta: TurnMeta


@dataclass(frozen=True)
class _Options:
    fold: bool
    min_quality_score: float | None
    max_conversations: int
    on_progress: OnProgress | None
    should_stop: ShouldStop | None


# ----------------------------------------------------------------------------- reading


def read_text(path: str | Path) -> str:
    """The file's text; a directory, a binary file or non-UTF-8 bytes are refused with a message.

    A UTF-8 byte-order mark (as Windows editors save files) is accepted and removed.
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(str(path), ["is a directory, not a dataset file"])
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(str(path), ["file not found"]) from None
    except OSError as err:
        raise DatasetError(str(path), [f"cannot be read: {err.strerror or err}"]) from None
    if b"\x00" in raw:
        raise DatasetError(str(path), ["is a binary file (it contains NUL bytes), not JSON or JSONL text"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(
            str(path), [f"not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 1]!r})"]
        ) from None


def detect_format(text: str) -> str:
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            return "chat-jsonl"  # several JSON objects, one per line (a broken one is reported there)
        if isinstance(obj, dict) and "messages" in obj and "conversations" not in obj:
            return "chat-jsonl"
        return "brightrun-lora-v4"
    if stripped.startswith("["):
        return "brightrun-lora-v4"  # reported as an error by the loader: the export is an object
    return "chat-jsonl"


def load_dataset(
    path: str | Path,
    fmt: str = "auto",
    *,
    fold: bool = True,
    min_quality_score: float | None = None,
    max_conversations: int = MAX_CONVERSATIONS,
    on_progress: OnProgress | None = None,
    should_stop: ShouldStop | None = None,
) -> LoadedDataset:
    """Read and validate a dataset file; raises DatasetError naming every problem's place."""
    return parse_dataset(
        read_text(path),
        fmt,
        source=str(path),
        fold=fold,
        min_quality_score=min_quality_score,
        max_conversations=max_conversations,
        on_progress=on_progress,
        should_stop=should_stop,
    )


def parse_dataset(
    text: str,
    fmt: str = "auto",
    *,
    source: str = "<input>",
    fold: bool = True,
    min_quality_score: float | None = None,
    max_conversations: int = MAX_CONVERSATIONS,
    on_progress: OnProgress | None = None,
    should_stop: ShouldStop | None = None,
) -> LoadedDataset:
    """Validate dataset text (see `load_dataset`); `min_quality_score` keeps lower-rated targets as
    context without loss; `on_progress(done, total)` and `should_stop()` see every conversation."""
    text = text.removeprefix("\ufeff")
    opts = _Options(fold, min_quality_score, max_conversations, on_progress, should_stop)
    if fmt == "auto":
        fmt = detect_format(text)
    if fmt == "brightrun-lora-v4":
        loaded = _parse_brightrun(text, source, opts)
    elif fmt == "chat-jsonl":
        loaded = _parse_chat_jsonl(text, source, opts)
    else:
        raise DatasetError(source, [f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})"])
    if not any(c.targets for c in loaded.conversations):
        why = " (every target is below min_quality_score)" if loaded.stats.quality_filtered_targets else ""
        raise DatasetError(
            source, [f"nothing to train on: no example has a target (assistant) response left{why}"]
        )
    return loaded


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(source, [f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"]) from None
    except RecursionError:
        raise DatasetError(
            source, ["JSON nested too deeply to be a dataset (arrays/objects inside each other)"]
        ) from None


# ----------------------------------------------------------------------------- brightrun-lora-v4


def _parse_brightrun(text: str, source: str, opts: _Options) -> LoadedDataset:
    doc = _load_json(text, source)
    if not isinstance(doc, dict):
        raise DatasetError(
            source, [f"top level must be an object with 'conversations', got {type(doc).__name__}"]
        )
    if "conversations" not in doc:
        raise DatasetError(source, ["missing field 'conversations' at the top level"])
    raw_convs = doc["conversations"]
    if not isinstance(raw_convs, list):
        raise DatasetError(source, ["'conversations' must be a list"])
    if len(raw_convs) > opts.max_conversations:
        raise DatasetError(
            source, [f"{len(raw_convs)} conversations, more than the limit of {opts.max_conversations}"]
        )
    problems: list[str] = []
    profile, info = parse_file_meta(doc, problems)
    stats = LoadStats("brightrun-lora-v4", opts.fold, opts.min_quality_score, conversations=len(raw_convs))
    out: list[Conversation] = []
    ticker = Ticker("loading", len(raw_convs), opts.on_progress, opts.should_stop)
    for ci, rc in enumerate(raw_convs):
        ticker.tick(ci)
        out += _parse_brightrun_conversation(rc, f"conversations[{ci}]", opts, stats, problems)
    ticker.tick(len(raw_convs))
    if problems:
        raise DatasetError(source, problems)
    return LoadedDataset("brightrun-lora-v4", tuple(out), stats, profile, info)


def _parse_brightrun_conversation(
    rc: Any, where: str, opts: _Options, stats: LoadStats, problems: list[str]
) -> list[Conversation]:
    if not isinstance(rc, dict):
        problems.append(f"{where}: must be an object")
        return []
    meta = rc.get("conversation_metadata") or {}
    if not isinstance(meta, dict):
        problems.append(f"{where}: conversation_metadata: must be an object")
        meta = {}
    pairs = rc.get("training_pairs")
    if not isinstance(pairs, list) or not pairs:
        problems.append(f"{where}: 'training_pairs' must be a non-empty list")
        return []
    first = pairs[0].get("conversation_id") if isinstance(pairs[0], dict) else None
    cid = str(meta.get("conversation_id") or first or where)
    scaffolding = parse_scaffolding(meta, f"conversation {cid}", problems)
    parsed = []
    for pi, p in enumerate(pairs):
        pair = _parse_pair(p, f"conversation {cid} pair {pi}", problems)
        if pair is not None:
            parsed.append(pair)
    if len(parsed) != len(pairs):
        return []
    stats.pairs += len(parsed)
    stats.skipped_null_targets += sum(1 for p in parsed if p.target is None)
    parsed.sort(key=lambda p: p.turn)
    trained = {
        p.turn for p in parsed if p.target is not None and _keeps(p.meta, opts.min_quality_score, stats)
    }
    folded = _fold(cid, parsed, trained) if opts.fold else None
    if folded is not None:
        stats.folded_conversations += 1
        convs = [folded]
    else:
        stats.unfolded_conversations += 1
        convs = [_single_pair(cid, p) for p in parsed if p.turn in trained]
    return [Conversation(c.id, c.messages, scaffolding) for c in convs if c.targets]


def _keeps(meta: TurnMeta, min_quality_score: float | None, stats: LoadStats) -> bool:
    """Whether a target is trained under the quality filter (a target without a score is kept)."""
    if min_quality_score is None:
        return True
    if meta.quality_score is None:
        stats.targets_without_quality_score += 1
        return True
    if meta.quality_score < min_quality_score:
        stats.quality_filtered_targets += 1
        return False
    return True


def _parse_pair(p: Any, where: str, problems: list[str]) -> _Pair | None:
    if not isinstance(p, dict):
        problems.append(f"{where}: must be an object")
        return None
    turn = p.get("turn_number")
    if not isinstance(turn, int) or isinstance(turn, bool):
        problems.append(f"{where}: turn_number: must be an integer, got {turn!r}")
        return None
    where = where.rsplit(" pair ", 1)[0] + f" turn {turn}"
    errs: list[str] = []
    system = p.get("system_prompt", "")
    if system is None:
        system = ""
    if not isinstance(system, str):
        errs.append(f"{where}: system_prompt: must be a string")
    user = p.get("current_user_input")
    if not isinstance(user, str) or not user.strip():
        errs.append(f"{where}: current_user_input: must be a non-empty string")
    if "target_response" not in p:
        errs.append(f"{where}: target_response: missing (use null to skip a pair)")
    target = p.get("target_response")
    if target is not None and not isinstance(target, str):
        errs.append(f"{where}: target_response: must be a string or null, got {type(target).__name__}")
    history = p.get("conversation_history", [])
    if not isinstance(history, list):
        errs.append(f"{where}: conversation_history: must be a list")
        history = []
    errs += check_messages(history, f"{where}: conversation_history", allow_system=False, end_with=None)
    if history and not errs and history[-1]["role"] != "assistant":
        errs.append(
            f"{where}: conversation_history: must end with an assistant turn before the new user input"
        )
    meta = parse_turn_meta(p, turn, where, errs)
    problems += errs
    if errs:
        return None
    return _Pair(turn, system, history, user, target, meta)


def check_messages(msgs: list, where: str, *, allow_system: bool, end_with: str | None) -> list[str]:
    """Problems of a role/content message list: known roles, string content, user/assistant alternating."""
    errs = []
    expected = "user"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            errs.append(f"{where}[{i}]: must be an object with 'role' and 'content'")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            errs.append(f"{where}[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            continue
        if not isinstance(content, str):
            errs.append(f"{where}[{i}].content: must be a string, got {type(content).__name__}")
        if role == "system":
            if not (allow_system and i == 0):
                errs.append(f"{where}[{i}].role: 'system' is only allowed as the first message")
            continue
        if role != expected:
            errs.append(
                f"{where}[{i}].role: roles must alternate user/assistant; expected {expected!r}, got {role!r}"
            )
        expected = "assistant" if role == "user" else "user"
    if end_with and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") != end_with:
        errs.append(f"{where}: the last message must be from the {end_with}")
    return errs


def _fold(cid: str, pairs: list[_Pair], trained: set[int]) -> Conversation | None:
    """One multi-turn conversation from consistent pairs, or None when they disagree.

    The last pair's history plus its own turn is the transcript; pair k (turns numbered 1..n) must
    carry exactly the transcript's first 2(k-1) messages as history, its user input next, and its
    target (when it has one) after that. A null target's reply is known only from later histories.
    """
    last = pairs[-1]
    full = [*last.history, {"role": "user", "content": last.user}]
    if last.target is not None:
        full.append({"role": "assistant", "content": last.target})
    if len(full) != 2 * len(pairs) - (last.target is None):
        return None  # the last pair's history is shorter or longer than the turns before it imply
    meta_at: dict[int, TurnMeta] = {}
    for k, p in enumerate(pairs):
        if p.turn != k + 1 or p.system != last.system:
            return None
        if p.history != full[: 2 * k] or full[2 * k]["content"] != p.user:
            return None
        if p.target is not None:
            if full[2 * k + 1]["content"] != p.target:
                return None
            if p.turn in trained:
                meta_at[2 * k + 1] = p.meta
    msgs = [Message("system", last.system)] if last.system else []
    msgs += [
        Message(m["role"], m["content"], train=i in meta_at, meta=meta_at.get(i)) for i, m in enumerate(full)
    ]
    # A trailing assistant turn that is nobody's target is context for nothing: drop it.
    while msgs and msgs[-1].role == "assistant" and not msgs[-1].train:
        msgs.pop()
    return Conversation(cid, tuple(msgs))


def _single_pair(cid: str, p: _Pair) -> Conversation:
    """One pair as its own conversation: its system prompt, its own history, its user input and target."""
    msgs = [Message("system", p.system)] if p.system else []
    msgs += [Message(h["role"], h["content"]) for h in p.history]
    msgs += [Message("user", p.user), Message("assistant", p.target or "", train=True, meta=p.meta)]
    return Conversation(f"{cid}{SPLIT_MARK}{p.turn}", tuple(msgs))


# ----------------------------------------------------------------------------- chat-jsonl


def _parse_chat_jsonl(text: str, source: str, opts: _Options) -> LoadedDataset:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) > opts.max_conversations:
        raise DatasetError(
            source, [f"{len(lines)} lines, more than the limit of {opts.max_conversations} conversations"]
        )
    problems: list[str] = []
    out: list[Conversation] = []
    stats = LoadStats("chat-jsonl", opts.fold, opts.min_quality_score)
    ticker = Ticker("loading", len(lines), opts.on_progress, opts.should_stop)
    for done, (lineno, line) in enumerate(lines):
        ticker.tick(done)
        convo = _parse_chat_line(line, f"line {lineno}", problems)
        if convo is not None:
            stats.conversations += 1
            stats.pairs += convo.targets
            if convo.targets:  # all-context conversations (every weight 0) train and test nothing
                out.append(convo)
    ticker.tick(len(lines))
    if not lines:
        problems.append("no conversations found (the file is empty)")
    if problems:
        raise DatasetError(source, problems)
    stats.folded_conversations = stats.conversations
    notes = ("chat-jsonl carries no conversation metadata: no arcs, personas, topics or quality scores",)
    return LoadedDataset("chat-jsonl", tuple(out), stats, notes=notes)


def _parse_chat_line(line: str, where: str, problems: list[str]) -> Conversation | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        problems.append(f"{where}: not JSON: {err.msg} at column {err.colno}")
        return None
    except RecursionError:
        problems.append(f"{where}: JSON nested too deeply to be a conversation")
        return None
    if not isinstance(obj, dict) or "messages" not in obj:
        problems.append(f"{where}: must be an object with a 'messages' list")
        return None
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        problems.append(f"{where}: messages: must be a non-empty list")
        return None
    errs = check_messages(msgs, f"{where}: messages", allow_system=True, end_with="assistant")
    if errs:
        problems += errs
        return None
    # OpenAI's format: an assistant message with "weight": 0 is context, not a target.
    convo = tuple(
        Message(m["role"], m["content"], train=m["role"] == "assistant" and m.get("weight", 1) != 0)
        for m in msgs
    )
    return Conversation(str(obj.get("id", f"line-{where.split()[-1]}")), convo)


def load_conversations(
    path: str | Path, fmt: str = "auto", *, fold: bool = True
) -> tuple[list[Conversation], LoadStats]:
    """The conversations and counts of a dataset file (see `load_dataset` for the whole of it)."""
    loaded = load_dataset(path, fmt, fold=fold)
    return list(loaded.conversations), loaded.stats


# Names that moved to the package's other modules, still importable from here until every caller
# imports them from `lora_worker.runtime.data`.
_MOVED = {
    "IGNORE_INDEX": "conversation",
    "DatasetError": "conversation",
    "Example": "examples",
    "build_examples": "examples",
    "collate": "batches",
    "collate_packed": "batches",
    "plan_micro_batches": "batches",
    "plan_packed": "batches",
    "prepare_dataset": "prepare",
    "split_conversations": "split",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = importlib.import_module(f"lora_worker.runtime.data.{_MOVED[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
