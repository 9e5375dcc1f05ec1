"""Dataset ingestion: load, validate, fold, tokenize (assistant-only labels), split and batch.

Input layouts:
- `brightrun-lora-v4`: `{"conversations": [{"conversation_metadata": {...}, "training_pairs": [...]}]}`
  where each pair repeats its conversation's earlier turns in `conversation_history`;
- `chat-jsonl`: one `{"messages": [{"role", "content"}, ...]}` per line (OpenAI/Together style).

Everything here is plain functions over plain values; validation collects every problem with its
place (conversation id and turn, or JSONL line) and raises once, before any model is loaded.

Folding: a brightrun conversation whose pairs agree with each other (each pair's history is the
earlier pairs' inputs and targets) is trained once as one multi-turn example with loss on every
target turn, instead of once per pair, which re-processes the shared prefix again and again.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A dataset with problems; `problems` lists each with its location."""

    def __init__(self, source: str, problems: list[str], limit: int = 50):
        self.problems = problems
        shown = problems[:limit]
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(
            f"dataset {source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in shown) + more
        )


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = False  # loss on this message (assistant turns that were a target)


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[Message, ...]


@dataclass
class LoadStats:
    format: str = ""
    conversations: int = 0
    pairs: int = 0
    skipped_null_targets: int = 0
    folded_conversations: int = 0
    unfolded_conversations: int = 0  # inconsistent pairs, trained pair by pair


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence; labels are IGNORE_INDEX except on trained assistant tokens."""

    conversation_id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class TokenStats:
    examples: int = 0
    truncated: int = 0  # examples whose context was cut at a turn boundary or from the left
    dropped_targets: int = 0  # targets longer than max_seq_length on their own (never cut)
    tokens_total: int = 0
    tokens_unfolded: int = 0  # what training pair by pair would process
    trainable_tokens: int = 0


# ----------------------------------------------------------------------------- loading


def detect_format(text: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return "chat-jsonl"  # several JSON objects, one per line
        if isinstance(obj, dict) and "messages" in obj and "conversations" not in obj:
            return "chat-jsonl"
        return "brightrun-lora-v4"
    if stripped.startswith("["):
        return "brightrun-lora-v4"  # reported as an error by the loader: the export is an object
    return "chat-jsonl"


def load_conversations(
    path: str | Path, fmt: str = "auto", *, fold: bool = True
) -> tuple[list[Conversation], LoadStats]:
    """Read and validate a dataset file; raises DatasetError naming every problem's place."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(str(path), ["file not found"]) from None
    except UnicodeDecodeError as err:
        raise DatasetError(str(path), [f"not UTF-8 text ({err})"]) from None
    return parse_conversations(text, fmt, source=str(path), fold=fold)


def parse_conversations(
    text: str, fmt: str = "auto", *, source: str = "<input>", fold: bool = True
) -> tuple[list[Conversation], LoadStats]:
    if fmt == "auto":
        fmt = detect_format(text)
    if fmt == "brightrun-lora-v4":
        convs, stats = _parse_brightrun(text, source, fold)
    elif fmt == "chat-jsonl":
        convs, stats = _parse_chat_jsonl(text, source)
    else:
        raise DatasetError(source, [f"unknown format {fmt!r}"])
    stats.format = fmt
    if not any(m.train for c in convs for m in c.messages):
        raise DatasetError(source, ["nothing to train on: no example has a target (assistant) response left"])
    return convs, stats


def _parse_brightrun(text: str, source: str, fold: bool) -> tuple[list[Conversation], LoadStats]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(source, [f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"]) from None
    if not isinstance(doc, dict):
        raise DatasetError(
            source, [f"top level must be an object with 'conversations', got {type(doc).__name__}"]
        )
    if "conversations" not in doc:
        raise DatasetError(source, ["missing field 'conversations' at the top level"])
    raw_convs = doc["conversations"]
    if not isinstance(raw_convs, list):
        raise DatasetError(source, ["'conversations' must be a list"])

    problems: list[str] = []
    stats = LoadStats(conversations=len(raw_convs))
    out: list[Conversation] = []
    for ci, rc in enumerate(raw_convs):
        where = f"conversations[{ci}]"
        if not isinstance(rc, dict):
            problems.append(f"{where}: must be an object")
            continue
        meta = rc.get("conversation_metadata") or {}
        cid = meta.get("conversation_id") if isinstance(meta, dict) else None
        pairs = rc.get("training_pairs")
        if not isinstance(pairs, list) or not pairs:
            problems.append(f"{where}: 'training_pairs' must be a non-empty list")
            continue
        cid = str(cid or (pairs[0].get("conversation_id") if isinstance(pairs[0], dict) else None) or where)
        parsed = []
        for pi, p in enumerate(pairs):
            pair, errs = _parse_pair(p, f"conversation {cid} pair {pi}")
            problems += errs
            if pair is not None:
                parsed.append(pair)
        if len(parsed) != len(pairs):
            continue
        stats.pairs += len(parsed)
        stats.skipped_null_targets += sum(1 for p in parsed if p["target"] is None)
        parsed.sort(key=lambda p: p["turn"])
        folded = _fold(cid, parsed) if fold else None
        if folded is not None:
            stats.folded_conversations += 1
            out.append(folded)
        else:
            stats.unfolded_conversations += 1
            for p in parsed:
                if p["target"] is None:
                    continue
                msgs = [Message("system", p["system"])] if p["system"] else []
                msgs += [Message(h["role"], h["content"]) for h in p["history"]]
                msgs += [Message("user", p["user"]), Message("assistant", p["target"], train=True)]
                out.append(Conversation(f"{cid}#t{p['turn']}", tuple(msgs)))
    if problems:
        raise DatasetError(source, problems)
    return out, stats


def _parse_pair(p: Any, where: str) -> tuple[dict | None, list[str]]:
    if not isinstance(p, dict):
        return None, [f"{where}: must be an object"]
    turn = p.get("turn_number")
    if isinstance(turn, int) and not isinstance(turn, bool):
        where = where.rsplit(" pair ", 1)[0] + f" turn {turn}"
    else:
        return None, [f"{where}: turn_number: must be an integer, got {turn!r}"]
    errs = []
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
    errs += _check_messages(history, f"{where}: conversation_history", allow_system=False, end_with=None)
    if history and not errs and history[-1]["role"] != "assistant":
        errs.append(
            f"{where}: conversation_history: must end with an assistant turn before the new user input"
        )
    if errs:
        return None, errs
    return {"turn": turn, "system": system, "history": history, "user": user, "target": target}, []


def _check_messages(msgs: list, where: str, *, allow_system: bool, end_with: str | None) -> list[str]:
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


def _fold(cid: str, pairs: list[dict]) -> Conversation | None:
    """One multi-turn conversation from consistent pairs, or None when they disagree."""
    last = pairs[-1]
    full = [*last["history"], {"role": "user", "content": last["user"]}]
    if last["target"] is not None:
        full.append({"role": "assistant", "content": last["target"]})
    trained = set()
    for k, p in enumerate(pairs):
        if p["turn"] != k + 1 or p["system"] != last["system"]:
            return None
        if p["history"] != full[: 2 * k] or full[2 * k]["content"] != p["user"]:
            return None
        if p["target"] is not None:
            if 2 * k + 1 >= len(full) or full[2 * k + 1]["content"] != p["target"]:
                return None
            trained.add(2 * k + 1)
    msgs = [Message("system", last["system"])] if last["system"] else []
    msgs += [Message(m["role"], m["content"], train=i in trained) for i, m in enumerate(full)]
    # A trailing assistant turn that was nobody's target is context for nothing: drop it.
    while msgs and msgs[-1].role == "assistant" and not msgs[-1].train:
        msgs.pop()
    return Conversation(cid, tuple(msgs))


def _parse_chat_jsonl(text: str, source: str) -> tuple[list[Conversation], LoadStats]:
    problems: list[str] = []
    out: list[Conversation] = []
    stats = LoadStats()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: not JSON: {err.msg} at column {err.colno}")
            continue
        if not isinstance(obj, dict) or "messages" not in obj:
            problems.append(f"{where}: must be an object with a 'messages' list")
            continue
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            problems.append(f"{where}: messages: must be a non-empty list")
            continue
        errs = _check_messages(msgs, f"{where}: messages", allow_system=True, end_with="assistant")
        if errs:
            problems += errs
            continue
        stats.conversations += 1
        convo = []
        for m in msgs:
            # OpenAI's format: an assistant message with "weight": 0 is context, not a target.
            train = m["role"] == "assistant" and m.get("weight", 1) != 0
            stats.pairs += train
            convo.append(Message(m["role"], m["content"], train=train))
        out.append(Conversation(str(obj.get("id", f"line-{lineno}")), tuple(convo)))
    if not out and not problems:
        problems.append("no conversations found (the file is empty)")
    if problems:
        raise DatasetError(source, problems)
    stats.folded_conversations = stats.conversations
    return out, stats


# ----------------------------------------------------------------------------- tokenizing


def _render(tokenizer, messages: Sequence[Message], gen_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=gen_prompt,
    )


def tokenize_conversation(tokenizer, convo: Conversation) -> tuple[list[int], list[int], list[bool]]:
    """Token ids of the whole conversation and the token index where each message starts.

    Returns (ids, starts, trained) with `starts` having len(messages)+1 entries (the last is
    len(ids)). Message i owns ids[starts[i]:starts[i+1]]; for an assistant message, the part after
    its header (what the model must produce, including <|eot_id|>) is found by rendering the
    generation prompt, so the labels follow the tokenizer's own chat template.
    """
    msgs = convo.messages
    full = _render(tokenizer, msgs)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    char_starts = [0]
    for i in range(1, len(msgs)):
        prefix = _render(tokenizer, msgs[:i])
        if not full.startswith(prefix):
            raise DatasetError(convo.id, ["the chat template does not render conversations prefix by prefix"])
        char_starts.append(len(prefix))
    char_starts.append(len(full))
    starts = [_char_to_token(offsets, c) for c in char_starts]
    return ids, starts, [m.train for m in msgs]


def _char_to_token(offsets: list[tuple[int, int]], char: int) -> int:
    for t, (s, _e) in enumerate(offsets):
        if s >= char:
            return t
    return len(offsets)


def _assistant_body_start(tokenizer, convo: Conversation, i: int, starts: list[int], ids: list[int]) -> int:
    """First token of assistant message i after its role header (what the model must generate)."""
    header = _render(tokenizer, convo.messages[:i], gen_prompt=True)
    n = len(tokenizer(header, add_special_tokens=False)["input_ids"])
    return max(starts[i], min(n, starts[i + 1]))


def build_examples(
    tokenizer, conversations: Sequence[Conversation], max_seq_length: int
) -> tuple[list[Example], TokenStats]:
    """Tokenize conversations into training examples of at most max_seq_length tokens.

    An over-long conversation is split at turn boundaries into chunks that each keep as much
    preceding context as fits, with loss only on the target turns each chunk owns. A single
    turn whose context is still too long keeps its whole target and loses context from the left;
    a target longer than max_seq_length on its own is dropped and counted, never cut.
    """
    stats = TokenStats()
    out: list[Example] = []
    for convo in conversations:
        ids, starts, trained = tokenize_conversation(tokenizer, convo)
        msgs = convo.messages
        first = 1 if msgs and msgs[0].role == "system" else 0
        # What every chunk starts with: <bos> + the system message, or just <bos> for a chunk that does
        # not start at the conversation's first message (whose own tokens already hold the <bos>).
        bos = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
        head = ids[: starts[1]] if first else bos

        def prefix(s: int, head: list[int] = head, first: int = first) -> list[int]:
            return head if first or s > 0 else []

        body_start = {
            i: _assistant_body_start(tokenizer, convo, i, starts, ids) for i in range(len(msgs)) if trained[i]
        }
        todo = [i for i in range(len(msgs)) if trained[i]]
        # Pair-by-pair cost of the same targets: each pair re-reads everything before its target.
        stats.tokens_unfolded += sum(starts[a + 1] for a in todo)

        def chunk_len(s: int, e: int, starts: list[int] = starts, prefix=prefix) -> int:
            return len(prefix(s)) + starts[e + 1] - starts[s]

        k = 0
        while k < len(todo):
            a = todo[k]
            user = a - 1 if a - 1 >= first else a
            if chunk_len(user, a) > max_seq_length:
                target = ids[body_start[a] : starts[a + 1]]
                # Keep <bos> (+ system) even when the cut context is the conversation's first message,
                # whose own tokens begin with the <bos> that the left cut would remove.
                head = prefix(user) or bos
                begin = starts[user] + (len(bos) if user == 0 and not first else 0)
                room = max_seq_length - len(head) - len(target)
                if room < 1:
                    stats.dropped_targets += 1
                else:
                    context = ids[begin : body_start[a]][-room:]
                    x = head + context + target
                    y = [IGNORE_INDEX] * (len(head) + len(context)) + target
                    out.append(Example(convo.id, tuple(x), tuple(y)))
                    stats.truncated += 1
                k += 1
                continue
            end_k = k
            while end_k + 1 < len(todo) and chunk_len(user, todo[end_k + 1]) <= max_seq_length:
                end_k += 1
            end = todo[end_k]
            start = user
            while start - 2 >= first and chunk_len(start - 2, end) <= max_seq_length:
                start -= 2
            if start > first:
                stats.truncated += 1
            pre = prefix(start)
            x = pre + ids[starts[start] : starts[end + 1]]
            y = [IGNORE_INDEX] * len(x)
            offset = len(pre) - starts[start]
            for t in todo[k : end_k + 1]:
                for j in range(body_start[t], starts[t + 1]):
                    y[j + offset] = x[j + offset]
            out.append(Example(convo.id, tuple(x), tuple(y)))
            k = end_k + 1
    stats.examples = len(out)
    stats.tokens_total = sum(len(e.input_ids) for e in out)
    stats.trainable_tokens = sum(e.trainable_tokens for e in out)
    return out, stats


# ----------------------------------------------------------------------------- split and batch


def split_conversations(
    conversations: Sequence[Conversation], *, eval_fraction: float, max_eval: int, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out whole conversations (never single pairs), reproducibly for a given seed."""
    # Pair-by-pair fallbacks are named '<cid>#t<turn>': group them so a conversation never straddles.
    groups: dict[str, list[Conversation]] = {}
    for c in conversations:
        groups.setdefault(c.id.split("#t", 1)[0], []).append(c)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_eval = min(max_eval, round(len(keys) * eval_fraction))
    if eval_fraction > 0 and max_eval > 0 and len(keys) >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, len(keys) - 1)
    held = set(keys[:n_eval])
    train = [c for k in keys if k not in held for c in groups[k]]
    evals = [c for k in keys if k in held for c in groups[k]]
    return train, evals


def plan_micro_batches(lengths: Sequence[int], *, token_budget: int, max_rows: int) -> list[list[int]]:
    """Group examples into micro-batches of similar length within a token budget.

    A micro-batch is rows right-padded to its longest row, so its cost is rows x longest; sorting
    by length keeps the padding small. Rows never see each other (one example per row, causal
    attention, no mask needed: real tokens never attend to the padding that follows them), which
    keeps sdpa on its fastest kernel (see BENCHMARKS.md).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * longest > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_packed(lengths: Sequence[int], *, token_budget: int) -> list[list[int]]:
    """First-fit decreasing: examples concatenated into rows of at most token_budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return bins


def collate_packed(examples: Sequence[Example]) -> dict:
    """One padding-free row: examples back to back, positions restarting at 0 for each, and an
    explicit block-diagonal causal mask so no example attends to another. (Position ids alone are
    not a dependable isolation: whether they imply a mask depends on the attention kernel and the
    Transformers version.) The dense mask costs sdpa its flash kernel; see BENCHMARKS.md."""
    import torch

    total = sum(len(e.input_ids) for e in examples)
    ids = torch.empty((1, total), dtype=torch.long)
    labels = torch.empty((1, total), dtype=torch.long)
    pos = torch.empty((1, total), dtype=torch.long)
    mask = torch.zeros((1, 1, total, total), dtype=torch.bool)
    at = 0
    for e in examples:
        n = len(e.input_ids)
        ids[0, at : at + n] = torch.tensor(e.input_ids)
        labels[0, at : at + n] = torch.tensor(e.labels)
        pos[0, at : at + n] = torch.arange(n)
        mask[0, 0, at : at + n, at : at + n] = torch.tril(torch.ones((n, n), dtype=torch.bool))
        at += n
    # Every example's first label is IGNORE_INDEX (its <bos> is prompt), so the shifted loss never
    # asks one example's last token to predict the next example's first.
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int = 8) -> dict:
    """Right-padded tensors for one micro-batch: input_ids, labels (padding is IGNORE_INDEX)."""
    import torch

    longest = max(len(e.input_ids) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[r, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------- summary and CLI


@dataclass
class DatasetSummary:
    format: str
    conversations: int
    pairs: int
    skipped_null_targets: int
    folded_conversations: int
    unfolded_conversations: int
    train_conversations: int
    eval_conversations: int
    examples: int
    eval_examples: int
    truncated: int
    dropped: int
    tokens_total: int
    tokens_unfolded: int
    trainable_tokens: int
    eval_tokens: int
    fold_ratio: float
    tokenizer: str
    max_seq_length: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    eval_conversations: list[Conversation]
    summary: DatasetSummary


def prepare_dataset(
    path: str | Path,
    tokenizer,
    *,
    fmt: str = "auto",
    fold: bool = True,
    max_seq_length: int = 2048,
    eval_fraction: float = 0.1,
    max_eval: int = 24,
    seed: int = 42,
    tokenizer_name: str = "",
) -> PreparedData:
    """Load, validate, split by conversation and tokenize: everything a job needs from its dataset."""
    convs, load = load_conversations(path, fmt, fold=fold)
    train_c, eval_c = split_conversations(convs, eval_fraction=eval_fraction, max_eval=max_eval, seed=seed)
    train, tstats = build_examples(tokenizer, train_c, max_seq_length)
    evals, estats = build_examples(tokenizer, eval_c, max_seq_length)
    if not train:
        raise DatasetError(str(path), ["nothing to train on after the train/eval split and length limits"])
    notes = []
    if load.unfolded_conversations and fold:
        notes.append(
            f"{load.unfolded_conversations} conversation(s) had inconsistent pairs; trained pair by pair"
        )
    summary = DatasetSummary(
        format=load.format,
        conversations=load.conversations,
        pairs=load.pairs,
        skipped_null_targets=load.skipped_null_targets,
        folded_conversations=load.folded_conversations if fold else 0,
        unfolded_conversations=load.unfolded_conversations,
        train_conversations=len({c.id.split("#t", 1)[0] for c in train_c}),
        eval_conversations=len({c.id.split("#t", 1)[0] for c in eval_c}),
        examples=tstats.examples,
        eval_examples=estats.examples,
        truncated=tstats.truncated + estats.truncated,
        dropped=tstats.dropped_targets + estats.dropped_targets,
        tokens_total=tstats.tokens_total,
        tokens_unfolded=tstats.tokens_unfolded,
        trainable_tokens=tstats.trainable_tokens,
        eval_tokens=estats.tokens_total,
        fold_ratio=round(tstats.tokens_unfolded / max(1, tstats.tokens_total), 3),
        tokenizer=tokenizer_name,
        max_seq_length=max_seq_length,
        notes=notes,
    )
    return PreparedData(train, evals, eval_c, summary)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_worker validate", description="Validate a dataset file.")
    p.add_argument("path")
    p.add_argument("--format", default="auto", choices=["auto", "brightrun-lora-v4", "chat-jsonl"])
    p.add_argument(
        "--tokenizer", help="tokenizer directory (default: the tiny offline Llama-3-style tokenizer)"
    )
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument(
        "--no-fold", action="store_true", help="train pair by pair instead of folding conversations"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    if a.tokenizer:
        from transformers import AutoTokenizer

        tok, name = AutoTokenizer.from_pretrained(a.tokenizer), a.tokenizer
    else:
        from lora_worker.tools.tiny_model import build_tokenizer

        tok, name = build_tokenizer(), "tiny byte-level BPE (not Llama 3's; pass --tokenizer for real counts)"
    try:
        prepared = prepare_dataset(
            a.path,
            tok,
            fmt=a.format,
            fold=not a.no_fold,
            max_seq_length=a.max_seq_length,
            tokenizer_name=name,
        )
    except DatasetError as err:
        if a.json:
            print(json.dumps({"ok": False, "problems": err.problems}, indent=2))
        else:
            print(err, file=sys.stderr)
        return 1
    s = prepared.summary.as_dict()
    if a.json:
        print(json.dumps({"ok": True, **s}, indent=2))
    else:
        width = max(len(k) for k in s)
        for k, v in s.items():
            print(f"{k:<{width}}  {v}")
    return 0
