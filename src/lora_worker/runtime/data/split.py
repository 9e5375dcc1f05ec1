"""The held-out split and the before/after sample prompts, stratified by the dataset's scenarios.

Whole conversations are held out, never single turns: pair-by-pair fallbacks of one conversation
(`<id>#t<turn>`) stay together. With brightrun metadata the held-out share of each emotional arc
follows the arc's share of the file (at least one conversation per arc when there are at least as
many held-out conversations as arcs), and within an arc the personas take turns; without metadata
it is a plain seeded shuffle. The same seed always gives the same split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lora_worker.runtime.data.conversation import Conversation, Message, Scaffolding

UNKNOWN = "(none)"  # slice name of a conversation without that piece of metadata


def _groups(conversations: Sequence[Conversation]) -> dict[str, list[Conversation]]:
    groups: dict[str, list[Conversation]] = {}
    for c in conversations:
        groups.setdefault(c.group, []).append(c)
    return groups


def _arc(c: Conversation) -> str:
    return (c.scaffolding.emotional_arc if c.scaffolding else None) or UNKNOWN


def _persona(c: Conversation) -> str:
    return (c.scaffolding.persona if c.scaffolding else None) or UNKNOWN


def held_out_count(n_groups: int, *, eval_fraction: float, max_eval: int) -> int:
    """Conversations to hold out: the fraction, capped, at least one when asked for any, never all."""
    n_eval = min(max_eval, round(n_groups * eval_fraction))
    if eval_fraction > 0 and max_eval > 0 and n_groups >= 2:
        n_eval = max(1, n_eval)
    return max(0, min(n_eval, n_groups - 1))


def _allocate(sizes: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    """n split over strata in proportion to their sizes (largest remainder, ties by `rng`), with
    at least one per stratum when n allows it, never more than a stratum holds."""
    total = sum(sizes.values())
    names = sorted(sizes)
    rng.shuffle(names)
    exact = {s: n * sizes[s] / total for s in names}
    alloc = {s: int(exact[s]) for s in names}
    for s in sorted(names, key=lambda s: exact[s] - alloc[s], reverse=True)[: n - sum(alloc.values())]:
        alloc[s] += 1
    if n >= len(names):
        for s in names:
            while alloc[s] == 0:
                donor = max(names, key=lambda d: alloc[d])  # the largest allocation gives one up
                alloc[donor] -= 1
                alloc[s] += 1
    alloc = {s: min(alloc[s], sizes[s]) for s in names}
    while sum(alloc.values()) < min(n, total):  # what a full stratum could not take goes elsewhere
        s = max((s for s in names if alloc[s] < sizes[s]), key=lambda s: exact[s] - alloc[s])
        alloc[s] += 1
    return alloc


def _interleave(keys: list[str], key_of, rng: random.Random) -> list[str]:
    """`keys` shuffled within each value of `key_of`, then taken one value at a time in turn."""
    buckets: dict[str, list[str]] = {}
    for k in keys:
        buckets.setdefault(key_of(k), []).append(k)
    order = sorted(buckets)
    rng.shuffle(order)
    for b in order:
        rng.shuffle(buckets[b])
    out = []
    while any(buckets[b] for b in order):
        out += [buckets[b].pop() for b in order if buckets[b]]
    return out


def split_conversations(
    conversations: Sequence[Conversation], *, eval_fraction: float, max_eval: int, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out): whole conversations, stratified by arc and persona when the file has them."""
    groups = _groups(conversations)
    keys = sorted(groups)
    rng = random.Random(seed)
    n_eval = held_out_count(len(keys), eval_fraction=eval_fraction, max_eval=max_eval)
    if not any(c.scaffolding for c in conversations):
        rng.shuffle(keys)
        held = set(keys[:n_eval])
    else:
        by_arc: dict[str, list[str]] = {}
        for k in keys:
            by_arc.setdefault(_arc(groups[k][0]), []).append(k)
        alloc = _allocate({a: len(v) for a, v in by_arc.items()}, n_eval, rng)
        held = set()
        for arc in sorted(by_arc):
            ordered = _interleave(by_arc[arc], lambda k: _persona(groups[k][0]), rng)
            held.update(ordered[: alloc[arc]])
    train = [c for k in keys if k not in held for c in groups[k]]
    evals = [c for k in keys if k in held for c in groups[k]]
    return train, evals


@dataclass(frozen=True)
class Sample:
    """A held-out prompt for before/after generations: the context up to a target turn, and that target."""

    conversation_id: str
    prompt: tuple[Message, ...]
    reference: str
    scaffolding: Scaffolding | None = None

    def chat(self) -> list[dict[str, str]]:
        """The prompt as chat-template messages."""
        return [{"role": m.role, "content": m.content} for m in self.prompt]


def _sample_of(c: Conversation) -> Sample | None:
    targets = [i for i, m in enumerate(c.messages) if m.train]
    if not targets:
        return None
    t = targets[len(targets) // 2]  # a middle turn: some history, not the closing pleasantries
    return Sample(c.id, c.messages[:t], c.messages[t].content, c.scaffolding)


def pick_samples(eval_conversations: Sequence[Conversation], n: int, seed: int) -> list[Sample]:
    """Up to n held-out prompts, one per conversation, taking the emotional arcs in turn so the
    samples cover every arc when n is at least the number of arcs (seeded, reproducible)."""
    groups = _groups(eval_conversations)
    rng = random.Random(seed)
    order = _interleave(sorted(groups), lambda k: _arc(groups[k][0]), rng)
    out: list[Sample] = []
    for k in order:
        if len(out) >= n:
            break
        members = groups[k]
        sample = _sample_of(members[len(members) // 2])
        if sample is not None:
            out.append(sample)
    return out
