"""The brightrun export's metadata, typed: file info, consultant profile, scenario and turn ratings.

Metadata is optional everywhere (a file without it still trains), but a value of the wrong type
is refused with its place, since it would silently drop a conversation from its slice or let a
low-rated target through the quality filter.
"""

from __future__ import annotations

from typing import Any

from lora_worker.runtime.data.conversation import (
    ConsultantProfile,
    Emotions,
    FileInfo,
    Scaffolding,
    TurnMeta,
)

_NUMBER = (int, float)
_KIND_NAMES = {str: "a string", dict: "an object", list: "a list", _NUMBER: "a number"}


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str, errs: list[str]) -> Any:
    """obj[key] when it has the expected type; None when absent or null; a problem otherwise."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        errs.append(f"{_join(where, key)}: must be {_KIND_NAMES[kind]}, got {type(value).__name__}")
        return None
    return value


def _join(where: str, key: str) -> str:
    """A field's place: `key` at the top level, `where key` after a place, `where.key` inside a field."""
    if not where:
        return key
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _section(obj: dict, key: str, where: str, errs: list[str]) -> dict:
    value = _get(obj, key, dict, where, errs)
    return value or {}


def _texts(value: Any) -> tuple[str, ...]:
    """A list, a mapping of labelled items or one string, as a tuple of strings."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict):
        return tuple(str(v) for v in value.values() if v is not None)
    if isinstance(value, list):
        return tuple(str(v) for v in value if v is not None)
    return ()


def parse_file_meta(doc: dict, problems: list[str]) -> tuple[ConsultantProfile | None, FileInfo | None]:
    """`consultant_profile` and `training_file_metadata` of an export, each None when absent."""
    info_raw = _section(doc, "training_file_metadata", "", problems)
    info = None
    if info_raw:
        info = FileInfo(
            name=_str(info_raw.get("file_name") or info_raw.get("name")),
            version=_str(info_raw.get("version")),
            format_spec=_str(info_raw.get("format_spec")),
            vertical=_str(info_raw.get("vertical")),
        )
    raw = _section(doc, "consultant_profile", "", problems)
    if not raw:
        return None, info
    style = raw.get("communication_style")
    style = style if isinstance(style, dict) else {"tone": style}
    profile = ConsultantProfile(
        name=_str(raw.get("name")),
        business=_str(raw.get("business")),
        philosophy=_texts(raw.get("core_philosophy") or raw.get("philosophy")),
        tone=_str(style.get("tone")),
        techniques=_texts(style.get("techniques")),
        avoid=_texts(style.get("avoid")),
    )
    return profile, info


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_scaffolding(meta: dict, where: str, problems: list[str]) -> Scaffolding | None:
    """The conversation's persona, emotional arc and topic, or None when the export has none."""
    raw = _section(meta, "scaffolding", f"{where}: conversation_metadata", problems)
    if not raw:
        return None
    here = f"{where}: conversation_metadata.scaffolding"
    return Scaffolding(
        persona=_get(raw, "persona_key", str, here, problems),
        emotional_arc=_get(raw, "emotional_arc_key", str, here, problems),
        topic=_get(raw, "training_topic_key", str, here, problems),
    )


def parse_turn_meta(pair: dict, turn: int, where: str, errs: list[str]) -> TurnMeta:
    """Quality, difficulty, skills and the user's emotions for one pair (each None when absent)."""
    tm = _section(pair, "training_metadata", f"{where}:", errs)
    here = f"{where}: training_metadata"
    skills = _get(tm, "demonstrates_skills", list, here, errs) or []
    if not all(isinstance(s, str) for s in skills):
        errs.append(f"{here}.demonstrates_skills: must be a list of strings")
        skills = []
    emotional = _section(pair, "emotional_context", f"{where}:", errs)
    detected = _section(emotional, "detected_emotions", f"{where}: emotional_context", errs)
    here_e = f"{where}: emotional_context.detected_emotions"
    emotions = None
    if detected:
        emotions = Emotions(
            primary=_get(detected, "primary", str, here_e, errs),
            primary_confidence=_get(detected, "primary_confidence", _NUMBER, here_e, errs),
            secondary=_get(detected, "secondary", str, here_e, errs),
            intensity=_get(detected, "intensity", _NUMBER, here_e, errs),
        )
    quality = _get(tm, "quality_score", _NUMBER, here, errs)
    return TurnMeta(
        turn=turn,
        quality_score=None if quality is None else float(quality),
        difficulty_level=_get(tm, "difficulty_level", str, here, errs),
        demonstrates_skills=tuple(skills),
        emotions=emotions,
    )
