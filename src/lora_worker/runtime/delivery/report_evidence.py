"""The evidence sections of the client report (report["evidence"], see evaluation/evidence.py):
judged win rates, loss by slice, scenarios side by side, forgetting and end of turn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_worker.runtime.delivery.report_view import (
    MISSING,
    Bullets,
    Image,
    Para,
    Pre,
    Section,
    SideBySide,
    Table,
    fmt,
    interval,
    number,
    pct,
    section,
)

SLICE_TITLES = {"arc": "Emotional arc", "persona": "Persona", "topic": "Topic"}
MD_SCENARIOS = 20  # scenarios shown in report.md (report.html and report.json hold them all)
HTML_SCENARIOS = 200
CUT = "cut at the token limit"  # a reply that never emitted its end-of-turn token


def _rate_cells(rates: Mapping[str, Any]) -> tuple[str, str, str, str]:
    def cell(key: str) -> str:
        r = section(rates, key)
        return f"{pct(r.get('share'))} ({interval(r.get('interval_95'), as_pct=True, signed=False)})"

    net = section(rates, "net")
    net_cell = f"{_points(net.get('share'))} ({interval(net.get('interval_95'), as_pct=True)})"
    return cell("win"), cell("tie"), cell("loss"), net_cell


def judge(ev: Mapping[str, Any]) -> Section | None:
    j = section(ev, "judge")
    if not j:
        if ev.get("scenarios"):
            return Section("judge", "Judged comparison", [Para(str(ev.get("headline") or ""))])
        return None
    overall = section(section(j, "summary"), "overall")
    parts: list = [Para(str(j.get("headline") or ""), strong=True)]
    if overall:
        rows = [
            ("Adapted model preferred (win)", fmt(overall.get("wins")), *_share(overall, "win")),
            ("Tie (or the two orders disagreed)", fmt(overall.get("ties")), *_share(overall, "tie")),
            ("Base model preferred (loss)", fmt(overall.get("losses")), *_share(overall, "loss")),
        ]
        net = section(overall, "net")
        rows.append(
            ("Net margin (win minus loss)", fmt(overall.get("n")), _points(net.get("share")),
             interval(net.get("interval_95"), as_pct=True))
        )  # fmt: skip
        parts += [Table(("Outcome", "Scenarios", "Share", "95 % interval"), rows, (False, True, True, True))]
        parts.append(Image("judge", "Win, tie and loss shares, overall and per slice"))
    parts.append(
        Para(
            f"Judged by {j.get('judged_by') or MISSING}, blind (it saw Reply A and Reply B, never which model "
            f"wrote which), each pair twice with the order swapped: {fmt(j.get('judged'))} of "
            f"{fmt(j.get('requested'))} scenarios, {fmt(j.get('calls'))} judge calls in {fmt(j.get('seconds'), 0)} s. "
            f"{fmt(j.get('unparseable'))} answer(s) had no readable verdict and {fmt(j.get('disagreements'))} pair(s) "
            "got opposite verdicts in the two orders; both count as ties."
        )
    )
    if j.get("stopped"):
        parts.append(Para(str(j["stopped"])))
    for key, rows in sorted(section(section(j, "summary"), "slices").items()):
        table_rows = [
            (str(r.get("value")), fmt(section(r, "rates").get("n")), *_rate_cells(section(r, "rates")))
            for r in rows
            if isinstance(r, Mapping)
        ]
        cols = (SLICE_TITLES.get(key, key), "n", "Win", "Tie", "Loss", "Net margin")
        parts.append(Table(cols, table_rows, (False, True, True, True, True, True)))
    if j.get("rubric"):
        parts.append(Pre(str(j["rubric"]), summary="The judge's rubric"))
    return Section("judge", "Judged comparison", parts)


def _points(value: Any) -> str:
    v = number(value)
    return MISSING if v is None else f"{v * 100:+.0f} points"


def _share(rates: Mapping[str, Any], key: str) -> tuple[str, str]:
    r = section(rates, key)
    return pct(r.get("share")), interval(r.get("interval_95"), as_pct=True, signed=False)


def slices(ev: Mapping[str, Any]) -> Section | None:
    s = section(ev, "slices")
    if not s:
        return None
    parts: list = [
        Para(
            "Change in held-out loss per conversation (after minus before, nats per token; negative is "
            "better), averaged per slice, with bootstrap 95 % intervals of the mean."
        )
    ]
    tables = section(s, "tables")
    if "arc" in tables:
        parts.append(Image("slices", "Mean change in held-out loss per emotional arc, with 95 % intervals"))
    for key, rows in tables.items():
        table_rows = [
            (
                str(r.get("value")),
                fmt(r.get("n")),
                fmt(r.get("mean_before")),
                fmt(r.get("mean_after")),
                f"{number(r.get('mean_delta')) or 0.0:+.4f}",
                interval(r.get("interval_95")),
            )
            for r in rows
            if isinstance(r, Mapping)
        ]
        cols = (
            SLICE_TITLES.get(key, key),
            "Conversations",
            "Before",
            "After",
            "Mean change",
            "95 % interval",
        )
        parts.append(Table(cols, table_rows, (False, True, True, True, True, True)))
    missing = [str(x) for x in s.get("unavailable") or []]
    if missing:
        parts += [Para("Slices that could not be made:"), Bullets(missing)]
    return Section("slices", "Held-out loss by slice", parts)


def _verdict_line(pair: Mapping[str, Any] | None) -> str:
    if not pair:
        return ""
    pref = pair.get("preference")
    picks = pair.get("picks") or []
    if pref == "adapted":
        return "judge: adapted reply preferred in both orders"
    if pref == "base":
        return "judge: base reply preferred in both orders"
    if len(picks) == 2 and picks[0] != picks[1] and "tie" not in picks:
        return "judge: tie (the two orders disagreed)"
    return "judge: tie"


def scenarios(ev: Mapping[str, Any], limit: int) -> Section | None:
    items = [s for s in ev.get("scenarios") or [] if isinstance(s, Mapping)]
    if not items:
        return None
    pairs = {
        p.get("scenario_id"): p for p in section(ev, "judge").get("pairs") or [] if isinstance(p, Mapping)
    }
    parts: list = [
        Para(
            f"{len(items)} scenario(s), each answered greedily by the base model (adapter disabled) and the "
            "adapted model; the reference is the dataset's reply (or the scenario file's)."
        )
    ]
    for i, s in enumerate(items[:limit], 1):
        msgs = [m for m in s.get("messages") or [] if isinstance(m, Mapping)]
        tags = ", ".join(f"{k}: {v}" for k, v in sorted(section(s, "tags").items()))
        earlier = f"{len(msgs) - 1} earlier message(s)" if len(msgs) > 1 else "no earlier messages"
        meta = " · ".join(x for x in (tags, earlier, _verdict_line(pairs.get(s.get("id")))) if x)
        fields = [
            ("User", str(msgs[-1].get("content") if msgs else ""), ""),
            ("Base model", str(s.get("base") or ""), "" if s.get("base_stopped") else CUT),
            ("With adapter", str(s.get("adapted") or ""), "" if s.get("adapted_stopped") else CUT),
        ]
        if s.get("reference"):
            fields.append(("Reference", str(s["reference"]), ""))
        parts.append(SideBySide(f"Scenario {i}: {s.get('id')}", meta, fields))
    if len(items) > limit:
        parts.append(Para(f"{len(items) - limit} more scenario(s) are in report.html and report.json."))
    return Section("scenarios", "Scenarios side by side", parts)


def forgetting(ev: Mapping[str, Any]) -> Section | None:
    f = section(ev, "forgetting")
    if not f:
        return None
    rows = [
        (
            str(r.get("kind")),
            fmt(r.get("n")),
            fmt(r.get("before")),
            fmt(r.get("after")),
            f"{number(r.get('delta')) or 0:+.4f}",
        )
        for r in f.get("by_kind") or []
        if isinstance(r, Mapping)
    ]
    rows.append(
        (
            "all",
            fmt(f.get("items")),
            fmt(f.get("before")),
            fmt(f.get("after")),
            f"{number(f.get('delta')) or 0:+.4f}",
        )
    )
    parts: list = [
        Para(
            "Loss of short reference answers to general questions (facts, arithmetic, instructions, code, "
            "reasoning) shipped with the worker, with the adapter disabled and enabled, in nats per token."
        ),
        Table(("Kind", "Items", "Base", "Adapted", "Change"), rows, (False, True, True, True, True)),
        Para(
            f"Change {pct(f.get('relative'), signed=True, digits=1)} (95 % interval of the mean per-item change "
            f"{interval(f.get('interval_95'))}); a rise above {pct(f.get('threshold'))} is flagged."
        ),
    ]
    if f.get("warning"):
        parts.append(Para(str(f["warning"]), strong=True))
    return Section("forgetting", "Forgetting probe", parts)


def end_of_turn(ev: Mapping[str, Any]) -> Section | None:
    e = section(ev, "end_of_turn")
    if not e:
        return None
    n = fmt(e.get("replies"))
    rows = [
        ("Base model", f"{fmt(e.get('base_stopped'))} of {n}", pct(e.get("base_share"))),
        ("With adapter", f"{fmt(e.get('adapted_stopped'))} of {n}", pct(e.get("adapted_share"))),
    ]
    parts: list = [
        Para(
            f"Replies that ended with the end-of-turn token before {fmt(e.get('max_new_tokens'))} new tokens. "
            f"A drop of more than {fmt((number(e.get('threshold')) or 0) * 100, 0)} percentage points for the "
            "adapter is flagged."
        ),
        Table(("Model", "Stopped", "Share"), rows, (False, True, True)),
    ]
    if e.get("warning"):
        parts.append(Para(str(e["warning"]), strong=True))
    return Section("end_of_turn", "End of turn", parts)


def notes(ev: Mapping[str, Any]) -> Section | None:
    items = [str(n) for n in ev.get("notes") or []]
    return Section("evidence_notes", "Notes on the evidence", [Bullets(items)]) if items else None


def sections(report: Mapping[str, Any], *, scenario_limit: int = HTML_SCENARIOS) -> list[Section]:
    ev = section(report, "evidence")
    if not ev:
        return []
    out = [judge(ev), slices(ev), scenarios(ev, scenario_limit), forgetting(ev), end_of_turn(ev), notes(ev)]
    return [s for s in out if s is not None]
