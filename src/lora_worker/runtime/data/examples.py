"""Conversations to training examples: assistant-only labels from the tokenizer's own chat template,
over-long conversations split at turn boundaries, and every dropped or cut target counted by cause.

Lengths are in tokens. A target (trained assistant turn) is never cut: an over-long conversation
is split into chunks at turn boundaries, each keeping as much preceding context as fits; a single
turn whose context is still too long keeps its whole target and loses context from the left; a
target that cannot fit at all is dropped and counted with its cause and the limit that would keep it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from lora_worker.runtime.data.conversation import IGNORE_INDEX, Conversation, DatasetError, Message
from lora_worker.runtime.data.hooks import OnProgress, ShouldStop, Ticker

END_OF_TURN = "<|eot_id|>"  # Llama 3's end-of-turn token; other templates end turns with eos
DROP_EXAMPLES_KEPT = 5  # conversation ids named in messages about dropped targets


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
    """What tokenizing at one max_seq_length kept, cut and dropped (tokens unless named otherwise)."""

    examples: int = 0
    tokens_total: int = 0  # every token of every example (one epoch)
    tokens_unfolded: int = 0  # what training pair by pair would process
    trainable_tokens: int = 0  # labelled tokens in the examples
    targets: int = 0  # target turns seen, kept or dropped
    target_tokens: int = 0  # labelled tokens of every target, kept or dropped
    dropped_target_too_long: int = 0  # targets that do not fit even without system prompt and context
    dropped_system_plus_target_too_long: int = 0  # fit alone, but not after the system prompt
    dropped_target_tokens: int = 0
    context_cut_targets: int = 0  # kept whole, their own user turn (and earlier context) cut from the left
    examples_missing_earlier_turns: int = 0  # chunks that start at a later turn, system prompt kept
    conversations_split: int = 0  # conversations trained as more than one example
    keep_all_max_seq_length: int = 0  # smallest limit keeping every dropped target with its user turn
    dropped_in: list[str] = field(default_factory=list)  # a few conversation ids with dropped targets

    @property
    def dropped_targets(self) -> int:
        return self.dropped_target_too_long + self.dropped_system_plus_target_too_long

    def merged(self, other: TokenStats) -> TokenStats:
        """Counts of both (train and held-out tokenized separately, reported together)."""
        out = TokenStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "keep_all_max_seq_length":
                setattr(out, f.name, max(a, b))
            elif f.name == "dropped_in":
                setattr(out, f.name, (a + b)[:DROP_EXAMPLES_KEPT])
            else:
                setattr(out, f.name, a + b)
        return out


# ----------------------------------------------------------------------------- one conversation


def render(tokenizer, messages: Sequence[Message], gen_prompt: bool = False) -> str:
    """The chat template's text for `messages` (with the assistant header after when `gen_prompt`)."""
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=gen_prompt,
    )


def tokenize_conversation(tokenizer, convo: Conversation) -> tuple[list[int], list[int], list[bool]]:
    """Token ids of the whole conversation and the token index where each message starts.

    Returns (ids, starts, trained) with `starts` having len(messages)+1 entries (the last is
    len(ids)). Message i owns ids[starts[i]:starts[i+1]].
    """
    msgs = convo.messages
    full = render(tokenizer, msgs)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    char_starts = [0]
    for i in range(1, len(msgs)):
        prefix = render(tokenizer, msgs[:i])
        if not full.startswith(prefix):
            raise DatasetError(
                "with this chat template",
                [f"conversation {convo.id}: the template does not render the conversation prefix by prefix"],
            )
        char_starts.append(len(prefix))
    char_starts.append(len(full))
    starts = [_char_to_token(offsets, c) for c in char_starts]
    return ids, starts, [m.train for m in msgs]


def _char_to_token(offsets: list[tuple[int, int]], char: int) -> int:
    for t, (s, _e) in enumerate(offsets):
        if s >= char:
            return t
    return len(offsets)


@dataclass(frozen=True)
class _Tokenized:
    """One conversation's tokens and where its messages and target bodies start."""

    id: str
    ids: list[int]
    starts: list[int]
    targets: list[int]  # message indices of trained assistant turns
    body: dict[int, int]  # target message index -> first token after its role header
    first: int  # 1 when message 0 is the system prompt, else 0
    bos: list[int]  # [<bos>] when the template starts with it, else []

    @property
    def head(self) -> list[int]:
        """What every chunk starts with: <bos> + the system message, or just <bos>."""
        return self.ids[: self.starts[1]] if self.first else self.bos

    def prefix(self, s: int) -> list[int]:
        """Tokens put before message s in a chunk starting there (message 0 holds its own <bos>)."""
        return self.head if self.first or s > 0 else []

    def chunk_len(self, s: int, e: int) -> int:
        return len(self.prefix(s)) + self.starts[e + 1] - self.starts[s]

    def user_of(self, a: int) -> int:
        return a - 1 if a - 1 >= self.first else a

    def target(self, a: int) -> list[int]:
        return self.ids[self.body[a] : self.starts[a + 1]]


def _tokenized(tokenizer, convo: Conversation) -> _Tokenized:
    ids, starts, trained = tokenize_conversation(tokenizer, convo)
    msgs = convo.messages
    targets = [i for i in range(len(msgs)) if trained[i]]
    body = {}
    for i in targets:
        # What the model must generate: after the assistant header the generation prompt renders.
        header = render(tokenizer, msgs[:i], gen_prompt=True)
        n = len(tokenizer(header, add_special_tokens=False)["input_ids"])
        body[i] = max(starts[i], min(n, starts[i + 1]))
    first = 1 if msgs and msgs[0].role == "system" else 0
    bos = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
    return _Tokenized(convo.id, ids, starts, targets, body, first, bos)


def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """Token ids that end an assistant turn: Llama 3's <|eot_id|> when the vocabulary has it, and eos."""
    ids = set()
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _check_end_of_turn(tokenizer, tok: _Tokenized, a: int, end_ids: frozenset[int]) -> None:
    """A target whose labels do not end with the end-of-turn token would teach a model never to stop."""
    target = tok.target(a)
    last = len(target)
    while last > 0 and target[last - 1] not in end_ids and not tokenizer.decode(target[last - 1 :]).strip():
        last -= 1  # a template may put whitespace after the end-of-turn token
    if last == 0 or target[last - 1] not in end_ids:
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(end_ids)) or "none"
        raise DatasetError(
            "with this chat template",
            [
                f"conversation {tok.id} message {a}: the assistant turn does not end with an end-of-turn token "
                f"({names}); a model trained on it would not learn to stop"
            ],
        )


# ----------------------------------------------------------------------------- examples


def _cut_left(tok: _Tokenized, a: int, max_len: int, stats: TokenStats) -> Example | None:
    """Target `a` with as much context as fits before it, or None (counted) when it cannot fit."""
    user = tok.user_of(a)
    target = tok.target(a)
    # Keep <bos> (+ system) even when the cut context is the conversation's first message, whose own
    # tokens begin with the <bos> that the left cut would remove.
    head = tok.prefix(user) or tok.bos
    room = max_len - len(head) - len(target)
    if room < 1:
        if len(tok.bos) + len(target) + 1 > max_len:
            stats.dropped_target_too_long += 1
        else:
            stats.dropped_system_plus_target_too_long += 1
        stats.dropped_target_tokens += len(target)
        stats.keep_all_max_seq_length = max(stats.keep_all_max_seq_length, tok.chunk_len(user, a))
        if tok.id not in stats.dropped_in and len(stats.dropped_in) < DROP_EXAMPLES_KEPT:
            stats.dropped_in.append(tok.id)
        return None
    begin = tok.starts[user] + (len(tok.bos) if user == 0 and not tok.first else 0)
    context = tok.ids[begin : tok.body[a]][-room:]
    stats.context_cut_targets += 1
    x = head + context + target
    y = [IGNORE_INDEX] * (len(head) + len(context)) + target
    return Example(tok.id, tuple(x), tuple(y))


def _chunk(tok: _Tokenized, start: int, targets: Sequence[int]) -> Example:
    """Messages start..targets[-1] with labels on the given targets' bodies."""
    pre = tok.prefix(start)
    x = pre + tok.ids[tok.starts[start] : tok.starts[targets[-1] + 1]]
    y = [IGNORE_INDEX] * len(x)
    offset = len(pre) - tok.starts[start]
    for t in targets:
        for j in range(tok.body[t], tok.starts[t + 1]):
            y[j + offset] = x[j + offset]
    return Example(tok.id, tuple(x), tuple(y))


def _conversation_examples(tok: _Tokenized, max_len: int, stats: TokenStats) -> list[Example]:
    """Chunks at turn boundaries, each as long as fits, in order; every target labelled once."""
    out: list[Example] = []
    todo = tok.targets
    k = 0
    while k < len(todo):
        a = todo[k]
        user = tok.user_of(a)
        if tok.chunk_len(user, a) > max_len:
            ex = _cut_left(tok, a, max_len, stats)
            out += [ex] if ex is not None else []
            k += 1
            continue
        end_k = k
        while end_k + 1 < len(todo) and tok.chunk_len(user, todo[end_k + 1]) <= max_len:
            end_k += 1
        start = user
        while start - 2 >= tok.first and tok.chunk_len(start - 2, todo[end_k]) <= max_len:
            start -= 2
        if start > tok.first:
            stats.examples_missing_earlier_turns += 1
        out.append(_chunk(tok, start, todo[k : end_k + 1]))
        k = end_k + 1
    if len(out) > 1:
        stats.conversations_split += 1
    return out


def build_examples(
    tokenizer,
    conversations: Sequence[Conversation],
    max_seq_length: int,
    *,
    on_progress: OnProgress | None = None,
    should_stop: ShouldStop | None = None,
) -> tuple[list[Example], TokenStats]:
    """Tokenize conversations into training examples of at most max_seq_length tokens.

    Raises DatasetError naming the conversation when the chat template's assistant turn does not
    end with an end-of-turn token, and PreprocessingCancelled when `should_stop()` turns True.
    """
    stats = TokenStats()
    out: list[Example] = []
    end_ids = end_of_turn_ids(tokenizer)
    ticker = Ticker("tokenizing", len(conversations), on_progress, should_stop)
    for n, convo in enumerate(conversations):
        ticker.tick(n)
        tok = _tokenized(tokenizer, convo)
        for a in tok.targets:
            _check_end_of_turn(tokenizer, tok, a, end_ids)
            stats.target_tokens += len(tok.target(a))
        stats.targets += len(tok.targets)
        # Pair-by-pair cost of the same targets: each pair re-reads everything before its target.
        stats.tokens_unfolded += sum(tok.starts[a + 1] for a in tok.targets)
        out += _conversation_examples(tok, max_seq_length, stats)
    ticker.tick(len(conversations))
    stats.examples = len(out)
    stats.tokens_total = sum(len(e.input_ids) for e in out)
    stats.trainable_tokens = sum(e.trainable_tokens for e in out)
    return out, stats
