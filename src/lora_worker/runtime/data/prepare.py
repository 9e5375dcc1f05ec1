"""Everything a job needs from its dataset: load, split by conversation, tokenize, and a typed
summary that says what was kept, cut, split and dropped, and why.

The summary is the dataset part of the job's events, result and report; `check_data_loss` refuses
a dataset that would lose more than a set share of its trainable target tokens to the length limit,
before any model weights are loaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data.conversation import Conversation, DatasetError, LoadedDataset
from lora_worker.runtime.data.examples import Example, TokenStats, build_examples
from lora_worker.runtime.data.formats import load_dataset
from lora_worker.runtime.data.hooks import OnProgress, ShouldStop
from lora_worker.runtime.data.split import UNKNOWN, split_conversations

DEFAULT_MAX_DROPPED_SHARE = 0.2  # of trainable target tokens; more refuses the dataset


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LengthReport(_Frozen):
    """What max_seq_length did to the targets (train and held-out together)."""

    targets: int = Field(
        title="Target turns", description="Trained assistant turns tokenized, kept or dropped."
    )
    target_tokens: int = Field(
        title="Target tokens", description="Labelled tokens of every target turn, kept or dropped."
    )
    dropped_targets: int = Field(title="Targets dropped", description="Targets that could not fit at all.")
    dropped_target_too_long: int = Field(
        title="Dropped: target alone longer than max_seq_length",
        description="Targets longer than max_seq_length even without system prompt and context.",
    )
    dropped_system_plus_target_too_long: int = Field(
        title="Dropped: system prompt plus target longer than max_seq_length",
        description="Targets that fit alone but not after the system prompt (kept whole in every example).",
    )
    dropped_target_tokens: int = Field(
        title="Target tokens dropped", description="Labelled tokens of dropped targets."
    )
    dropped_token_share: float = Field(
        title="Share of target tokens dropped", description="dropped_target_tokens / target_tokens, 0..1."
    )
    keep_all_max_seq_length: int | None = Field(
        title="max_seq_length that keeps every target",
        description="Smallest max_seq_length that keeps every dropped target with its own user turn; "
        "null when none was dropped.",
    )
    context_cut_targets: int = Field(
        title="Targets with context cut from the left",
        description="Targets kept whole whose own user turn (and what came before) was cut from the left.",
    )
    conversations_split: int = Field(
        title="Conversations split into chunks",
        description="Conversations trained as more than one example, split at turn boundaries.",
    )
    examples_missing_earlier_turns: int = Field(
        title="Chunks without the earlier turns",
        description="Examples that start at a later user turn (system prompt kept) because earlier turns did not fit.",
    )
    dropped_in: tuple[str, ...] = Field(
        title="Conversations with dropped targets (first few)", description="Up to 5 conversation ids."
    )


class QualityReport(_Frozen):
    """The quality filter: targets rated below `min_quality_score` stay as context without loss."""

    min_quality_score: float | None = Field(title="min_quality_score", description="null: filter off.")
    filtered_targets: int = Field(
        title="Targets below min_quality_score", description="Kept as context only."
    )
    targets_without_score: int = Field(
        title="Targets without a quality score", description="Kept (the filter cannot judge them)."
    )


class Slices(_Frozen):
    """Conversations per scenario value (brightrun `conversation_metadata.scaffolding`)."""

    emotional_arcs: dict[str, int] = Field(
        title="Emotional arcs", description="emotional_arc_key -> conversations."
    )
    personas: dict[str, int] = Field(title="Personas", description="persona_key -> conversations.")
    topics: dict[str, int] = Field(title="Topics", description="training_topic_key -> conversations.")


class SliceReport(_Frozen):
    has_metadata: bool = Field(
        title="Scenario metadata",
        description="Whether the file labels conversations with arcs, personas, topics.",
    )
    all: Slices = Field(title="All conversations", description="Slices of every conversation with a target.")
    held_out: Slices = Field(title="Held-out conversations", description="Slices of the held-out set.")


class DatasetSummary(_Frozen):
    """The validated dataset: what it holds, how it was split and tokenized, and what was lost."""

    format: str = Field(title="Format", description="brightrun-lora-v4 or chat-jsonl.")
    name: str | None = Field(title="Dataset name", description="training_file_metadata.file_name, if any.")
    version: str | None = Field(
        title="Dataset version", description="training_file_metadata.version, if any."
    )
    consultant: str | None = Field(title="Consultant", description="consultant_profile.name, if any.")
    conversations: int = Field(title="Conversations", description="Conversations in the file.")
    pairs: int = Field(
        title="Prompt/response pairs", description="Pairs (brightrun) or assistant targets (JSONL)."
    )
    skipped_null_targets: int = Field(
        title="Pairs without a target", description="target_response null: context only."
    )
    folded_conversations: int = Field(
        title="Conversations folded", description="Trained once with loss on every target."
    )
    unfolded_conversations: int = Field(
        title="Conversations trained pair by pair", description="Pairs whose histories disagree."
    )
    train_conversations: int = Field(title="Training conversations", description="Conversations trained on.")
    eval_conversations: int = Field(title="Held-out conversations", description="Conversations held out.")
    examples: int = Field(title="Training examples", description="Sequences per epoch.")
    eval_examples: int = Field(title="Held-out examples", description="Held-out sequences.")
    tokens_total: int = Field(
        title="Tokens per epoch", description="Tokens of the training examples (folded)."
    )
    tokens_unfolded: int = Field(
        title="Tokens per epoch pair by pair", description="What training pair by pair would process."
    )
    trainable_tokens: int = Field(
        title="Trainable tokens", description="Labelled tokens of the training examples."
    )
    eval_tokens: int = Field(title="Held-out tokens", description="Tokens of the held-out examples.")
    fold_ratio: float = Field(
        title="Token saving from folding (x)", description="tokens_unfolded / tokens_total."
    )
    tokenizer: str = Field(title="Tokenizer", description="The tokenizer that counted the tokens.")
    max_seq_length: int = Field(title="max_seq_length", description="Longest example in tokens.")
    length: LengthReport = Field(
        title="Length limit", description="Targets dropped, cut and split, by cause."
    )
    quality: QualityReport = Field(title="Quality filter", description="Targets filtered by quality score.")
    slices: SliceReport = Field(title="Slices", description="Arcs, personas and topics present.")
    warnings: tuple[str, ...] = Field(
        title="Warnings", description="Data lost or changed; for the job's warnings."
    )
    notes: tuple[str, ...] = Field(title="Notes", description="Other things worth knowing about the file.")

    def as_dict(self) -> dict:
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    eval: list[Example]
    eval_conversations: list[Conversation]
    summary: DatasetSummary
    dataset: LoadedDataset


# ----------------------------------------------------------------------------- the summary


def _length_report(s: TokenStats) -> LengthReport:
    return LengthReport(
        targets=s.targets,
        target_tokens=s.target_tokens,
        dropped_targets=s.dropped_targets,
        dropped_target_too_long=s.dropped_target_too_long,
        dropped_system_plus_target_too_long=s.dropped_system_plus_target_too_long,
        dropped_target_tokens=s.dropped_target_tokens,
        dropped_token_share=round(s.dropped_target_tokens / s.target_tokens, 4) if s.target_tokens else 0.0,
        keep_all_max_seq_length=s.keep_all_max_seq_length or None,
        context_cut_targets=s.context_cut_targets,
        conversations_split=s.conversations_split,
        examples_missing_earlier_turns=s.examples_missing_earlier_turns,
        dropped_in=tuple(s.dropped_in),
    )


def _slices(conversations: Sequence[Conversation]) -> Slices:
    firsts = {c.group: c for c in conversations}.values()  # one per source conversation
    scaff = [c.scaffolding for c in firsts]

    def count(values) -> dict[str, int]:
        return dict(sorted(Counter(v or UNKNOWN for v in values).items()))

    return Slices(
        emotional_arcs=count(s.emotional_arc if s else None for s in scaff),
        personas=count(s.persona if s else None for s in scaff),
        topics=count(s.topic if s else None for s in scaff),
    )


def describe_loss(length: LengthReport, max_seq_length: int) -> str:
    """One sentence: how many targets the length limit drops, why, and the limit that keeps them."""
    causes = []
    if length.dropped_system_plus_target_too_long:
        causes.append(
            f"{length.dropped_system_plus_target_too_long} fit alone but not after the system prompt "
            "(system prompt plus target longer than max_seq_length)"
        )
    if length.dropped_target_too_long:
        causes.append(f"{length.dropped_target_too_long} longer than max_seq_length on their own")
    return (
        f"{length.dropped_targets} of {length.targets} targets dropped at max_seq_length {max_seq_length} "
        f"({length.dropped_token_share:.1%} of the trainable target tokens): {'; '.join(causes)}; "
        f"max_seq_length {length.keep_all_max_seq_length} keeps them all (e.g. {', '.join(length.dropped_in)})"
    )


def _warnings(
    length: LengthReport, max_seq_length: int, eval_conversations: int, eval_examples: int
) -> list[str]:
    out = []
    if length.dropped_targets:
        out.append(describe_loss(length, max_seq_length))
    if length.context_cut_targets:
        out.append(
            f"{length.context_cut_targets} target(s) trained with their context cut from the left "
            f"(their own user turn did not fit whole in max_seq_length {max_seq_length})"
        )
    if length.conversations_split:
        out.append(
            f"{length.conversations_split} conversation(s) split into chunks at turn boundaries to fit "
            f"max_seq_length {max_seq_length}; {length.examples_missing_earlier_turns} chunk(s) start "
            "without the earlier turns"
        )
    if not eval_conversations:
        out.append("no held-out conversation: the loss before and after training cannot be measured")
    elif not eval_examples:
        out.append(
            f"the {eval_conversations} held-out conversation(s) lost every target to max_seq_length "
            f"{max_seq_length}: the loss before and after training cannot be measured"
        )
    return out


def _notes(loaded: LoadedDataset) -> list[str]:
    stats = loaded.stats
    min_quality_score = stats.min_quality_score
    out = list(loaded.notes)
    if stats.unfolded_conversations and stats.fold:
        out.append(
            f"{stats.unfolded_conversations} conversation(s) had inconsistent pairs; trained pair by pair"
        )
    if min_quality_score is not None:
        out.append(
            f"{stats.quality_filtered_targets} target(s) below quality score {min_quality_score:g} kept as context "
            "without loss"
            + (
                f"; {stats.targets_without_quality_score} without a score kept"
                if stats.targets_without_quality_score
                else ""
            )
        )
    if loaded.format != "chat-jsonl" and not loaded.has_metadata:
        out.append("no conversation_metadata.scaffolding: no arcs, personas or topics to slice by")
    return out


def summarize(
    loaded: LoadedDataset,
    split: tuple[Sequence[Conversation], Sequence[Conversation]],
    stats: tuple[TokenStats, TokenStats],
    *,
    max_seq_length: int,
    tokenizer_name: str,
) -> DatasetSummary:
    """The summary of a loaded, split (train, held-out) and tokenized (train, held-out) dataset."""
    (train_c, eval_c), (tstats, estats) = split, stats
    load = loaded.stats
    length = _length_report(tstats.merged(estats))
    eval_groups = len({c.group for c in eval_c})
    return DatasetSummary(
        format=loaded.format,
        name=loaded.info.name if loaded.info else None,
        version=loaded.info.version if loaded.info else None,
        consultant=loaded.profile.name if loaded.profile else None,
        conversations=load.conversations,
        pairs=load.pairs,
        skipped_null_targets=load.skipped_null_targets,
        folded_conversations=load.folded_conversations,
        unfolded_conversations=load.unfolded_conversations,
        train_conversations=len({c.group for c in train_c}),
        eval_conversations=eval_groups,
        examples=tstats.examples,
        eval_examples=estats.examples,
        tokens_total=tstats.tokens_total,
        tokens_unfolded=tstats.tokens_unfolded,
        trainable_tokens=tstats.trainable_tokens,
        eval_tokens=estats.tokens_total,
        fold_ratio=round(tstats.tokens_unfolded / max(1, tstats.tokens_total), 3),
        tokenizer=tokenizer_name,
        max_seq_length=max_seq_length,
        length=length,
        quality=QualityReport(
            min_quality_score=load.min_quality_score,
            filtered_targets=load.quality_filtered_targets,
            targets_without_score=load.targets_without_quality_score,
        ),
        slices=SliceReport(
            has_metadata=loaded.has_metadata, all=_slices(loaded.conversations), held_out=_slices(eval_c)
        ),
        warnings=tuple(_warnings(length, max_seq_length, eval_groups, estats.examples)),
        notes=tuple(_notes(loaded)),
    )


def check_data_loss(
    summary: DatasetSummary,
    max_share: float = DEFAULT_MAX_DROPPED_SHARE,
    *,
    option: str = "max_dropped_share",
) -> None:
    """Raise DatasetError, with the numbers and the fix, when the length limit would drop more than
    `max_share` (0..1) of the trainable target tokens; `option` names the setting that allows more."""
    length = summary.length
    if length.dropped_token_share <= max_share:
        return
    raise DatasetError(
        f"at max_seq_length {summary.max_seq_length}",
        [
            describe_loss(length, summary.max_seq_length),
            f"that is more than the {max_share:.0%} of target tokens allowed to be lost: raise max_seq_length "
            f"to {length.keep_all_max_seq_length}, shorten the system prompts, or raise {option}",
        ],
    )


# ----------------------------------------------------------------------------- preparing


def _offset(on_progress: OnProgress | None, before: int, total: int) -> OnProgress | None:
    """Progress of a second loop reported as part of one count over both loops."""
    if on_progress is None:
        return None
    return lambda done, _n: on_progress(before + done, total)


def prepare_dataset(
    dataset: LoadedDataset | str | Path,
    tokenizer,
    *,
    fmt: str = "auto",
    fold: bool = True,
    min_quality_score: float | None = None,
    max_seq_length: int = 2048,
    eval_fraction: float = 0.1,
    max_eval: int = 24,
    seed: int = 42,
    tokenizer_name: str = "",
    on_progress: OnProgress | None = None,
    should_stop: ShouldStop | None = None,
) -> PreparedData:
    """Split by conversation and tokenize a loaded dataset (or load it from a path first, with
    `fmt`, `fold` and `min_quality_score`, which a loaded dataset already applied). `on_progress(done, total)` counts tokenized
    conversations; `should_stop()` is asked before each one and raises PreprocessingCancelled."""
    loaded = (
        dataset
        if isinstance(dataset, LoadedDataset)
        else load_dataset(
            dataset, fmt, fold=fold, min_quality_score=min_quality_score, should_stop=should_stop
        )
    )
    train_c, eval_c = split_conversations(
        loaded.conversations, eval_fraction=eval_fraction, max_eval=max_eval, seed=seed
    )
    total = len(train_c) + len(eval_c)
    train, tstats = build_examples(
        tokenizer,
        train_c,
        max_seq_length,
        on_progress=_offset(on_progress, 0, total),
        should_stop=should_stop,
    )
    evals, estats = build_examples(
        tokenizer,
        eval_c,
        max_seq_length,
        on_progress=_offset(on_progress, len(train_c), total),
        should_stop=should_stop,
    )
    summary = summarize(
        loaded,
        (train_c, eval_c),
        (tstats, estats),
        max_seq_length=max_seq_length,
        tokenizer_name=tokenizer_name,
    )
    if not train:
        problems = ["nothing to train on after the train/held-out split and the length limit"]
        if summary.length.dropped_targets:
            problems.append(describe_loss(summary.length, max_seq_length))
        raise DatasetError(str(dataset) if not isinstance(dataset, LoadedDataset) else "dataset", problems)
    return PreparedData(train, evals, eval_c, summary, loaded)


# ----------------------------------------------------------------------------- readable rows


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {n}" for k, n in v.items()) or "none"
    if isinstance(v, tuple | list):
        return ", ".join(str(x) for x in v) or "none"
    return "none" if v is None else str(v)


def _rows(model: BaseModel) -> list[tuple[str, str]]:
    rows = []
    for name, f in type(model).model_fields.items():
        v = getattr(model, name)
        if isinstance(v, BaseModel):
            rows += [(f"{f.title}: {t}", x) for t, x in _rows(v)]
        else:
            rows.append((f.title or name, _value(v)))
    return rows


def summary_rows(summary: DatasetSummary) -> list[tuple[str, str]]:
    """(readable label, value) for every figure of the summary, warnings and notes left out."""
    skip = {"warnings", "notes"}
    if summary.quality.min_quality_score is None:
        skip.add("quality")
    if not summary.slices.has_metadata:
        skip.add("slices")
    rows = []
    for name, f in DatasetSummary.model_fields.items():
        if name in skip:
            continue
        v = getattr(summary, name)
        rows += (
            [(f"{f.title}: {t}", x) for t, x in _rows(v)]
            if isinstance(v, BaseModel)
            else [(f.title, _value(v))]
        )
    return rows
