"""The values every data module shares: conversations with their metadata, and the data errors.

A `Conversation` is what the file said, in order, with `train=True` on each assistant message that
is a target; the brightrun export's metadata rides along so that the held-out split, the sample
prompts and the report can be sliced by emotional arc, persona and topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label of a token that carries no loss (PyTorch's cross-entropy default)
ROLES = ("system", "user", "assistant")
SPLIT_MARK = "#t"  # pair-by-pair fallbacks are named '<conversation id>#t<turn number>'


class DatasetError(ValueError):
    """A dataset with problems; `problems` lists each with its place (conversation and turn, or line)."""

    def __init__(self, source: str, problems: list[str], limit: int = 50):
        self.source = source
        self.problems = problems
        shown = problems[:limit]
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(
            f"dataset {source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in shown) + more
        )


class PreprocessingCancelled(Exception):
    """Downloading, loading or tokenizing stopped because the caller's `should_stop()` returned True."""

    def __init__(self, stage: str, done: int, total: int, unit: str = "conversations"):
        self.stage, self.done, self.total = stage, done, total
        super().__init__(f"{stage} cancelled after {done} of {total or 'an unknown number of'} {unit}")


@dataclass(frozen=True)
class Emotions:
    """The user's detected emotions for one turn (brightrun `emotional_context.detected_emotions`)."""

    primary: str | None = None
    primary_confidence: float | None = None  # 0..1
    secondary: str | None = None
    intensity: float | None = None  # 0..1


@dataclass(frozen=True)
class TurnMeta:
    """What the export says about one target turn (brightrun `training_metadata` and `emotional_context`)."""

    turn: int
    quality_score: float | None = None  # the export's 1..5 rating of the target response
    difficulty_level: str | None = None
    demonstrates_skills: tuple[str, ...] = ()
    emotions: Emotions | None = None


@dataclass(frozen=True)
class Scaffolding:
    """The scenario a brightrun conversation was generated from (`conversation_metadata.scaffolding`)."""

    persona: str | None = None
    emotional_arc: str | None = None
    topic: str | None = None


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = False  # loss on this message (assistant turns that were a target)
    meta: TurnMeta | None = None  # target turns of a brightrun file


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[Message, ...]
    scaffolding: Scaffolding | None = None

    @property
    def group(self) -> str:
        """The source conversation's id: pair-by-pair fallbacks of one conversation share it."""
        return self.id.split(SPLIT_MARK, 1)[0]

    @property
    def targets(self) -> int:
        return sum(1 for m in self.messages if m.train)


@dataclass(frozen=True)
class ConsultantProfile:
    """The voice the dataset teaches (brightrun `consultant_profile`), for rubrics and the report."""

    name: str | None = None
    business: str | None = None
    philosophy: tuple[str, ...] = ()
    tone: str | None = None
    techniques: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()

    def describe(self) -> str:
        """A few plain sentences describing the consultant, for a judge's rubric."""
        parts = []
        if self.name:
            parts.append(
                f"The consultant is {self.name}" + (f" of {self.business}." if self.business else ".")
            )
        if self.philosophy:
            parts.append("Philosophy: " + "; ".join(self.philosophy) + ".")
        if self.tone:
            parts.append(f"Tone: {self.tone}.")
        if self.techniques:
            parts.append("Techniques: " + ", ".join(self.techniques) + ".")
        if self.avoid:
            parts.append("Avoids: " + ", ".join(self.avoid) + ".")
        return " ".join(parts)


@dataclass(frozen=True)
class FileInfo:
    """Dataset-level metadata of a brightrun export (`training_file_metadata`)."""

    name: str | None = None
    version: str | None = None
    format_spec: str | None = None
    vertical: str | None = None


@dataclass
class LoadStats:
    """Counts from reading a file, before tokenizing."""

    format: str = ""
    fold: bool = True  # consistent brightrun conversations folded into one example each
    min_quality_score: float | None = None  # the quality filter applied (None: off)
    conversations: int = 0
    pairs: int = 0
    skipped_null_targets: int = 0
    folded_conversations: int = 0
    unfolded_conversations: int = 0  # inconsistent pairs, trained pair by pair
    quality_filtered_targets: int = 0  # targets below min_quality_score, kept as context only
    targets_without_quality_score: int = 0


@dataclass(frozen=True)
class LoadedDataset:
    """A validated dataset file: its conversations and what the file says about itself."""

    format: str
    conversations: tuple[Conversation, ...]
    stats: LoadStats
    profile: ConsultantProfile | None = None
    info: FileInfo | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def has_metadata(self) -> bool:
        return any(c.scaffolding is not None for c in self.conversations)
