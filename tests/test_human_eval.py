"""The blinded human A/B sheet: written blind with a separate key, filled in as a reviewer would,
scored by `python -m lora_worker human-eval score` with the same rates as the model judge."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from lora_worker.runtime.evaluation.human_sheet import read_key, write_human_sheet
from lora_worker.tools import human_eval

# scenario -> which reply the "reviewer" prefers: 6 adapted, 2 base, 2 ties
TRUTH = ["adapted"] * 6 + ["base"] * 2 + ["tie"] * 2
ARCS = ["grief", "conflict"] * 5


def scenarios() -> list[dict]:
    return [
        {
            "id": f"conv{i}@3",
            "source": "held_out",
            "tags": {"arc": ARCS[i]},
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": f"Earlier worry {i}"},
                {"role": "assistant", "content": "Earlier answer"},
                {"role": "user", "content": f"What now, case {i}? <script>alert(1)</script>"},
            ],
            "reference": "ref",
            "base": f"first voice {i}",
            "adapted": f"second voice {i}",
            "base_stopped": True,
            "adapted_stopped": True,
        }
        for i in range(10)
    ]


def fill(sheet: Path, key_path: Path, choices_for=None) -> Path:
    """The sheet with `choice` filled from TRUTH through the key, as a reviewer's spreadsheet saves it."""
    key = read_key(key_path)
    rows = list(csv.DictReader(io.StringIO(sheet.read_text(encoding="utf-8-sig"))))
    for row in rows:
        k = key.items[row["item"]]
        want = TRUTH[int(k.scenario_id.removeprefix("conv").split("@")[0])]
        if choices_for is not None:
            row["choice"] = choices_for(row["item"], want, k.a)
        elif want == "tie":
            row["choice"] = " Tie "
        else:
            row["choice"] = "A" if k.a == want else "b"
    out = sheet.with_name("filled.csv")
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_round_trip_reproduces_a_known_win_rate(tmp_path: Path, capsys) -> None:
    files = write_human_sheet(scenarios(), tmp_path / "report", tmp_path / "key.json", seed=5, job_id="job-1")
    filled = fill(files.csv, files.key)
    assert human_eval.main(["score", str(filled), "--key", str(files.key), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    overall = result["summary"]["overall"]
    assert (overall["n"], overall["wins"], overall["losses"], overall["ties"]) == (10, 6, 2, 2)
    assert (overall["win"]["share"], overall["loss"]["share"], overall["tie"]["share"]) == (0.6, 0.2, 0.2)
    assert overall["net"]["share"] == 0.4 and overall["win"]["interval_95"] is not None
    arcs = {r["value"]: r["rates"] for r in result["summary"]["slices"]["arc"]}
    assert (arcs["grief"]["wins"], arcs["conflict"]["wins"]) == (3, 3)  # truth rows 0,2,4 and 1,3,5
    assert result["answered"] == 10 and result["unanswered"] == []
    assert human_eval.main(["score", str(filled), "--key", str(files.key)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Judged blind by the studio's reviewers on 10 scenarios")
    assert "by arc:" in text and "answered 10 of 10 items" in text


def test_the_sheet_is_blind_seeded_and_escaped(tmp_path: Path) -> None:
    one = write_human_sheet(scenarios(), tmp_path / "a", tmp_path / "a" / "key.json", seed=5)
    two = write_human_sheet(scenarios(), tmp_path / "b", tmp_path / "b" / "key.json", seed=5)
    other = write_human_sheet(scenarios(), tmp_path / "c", tmp_path / "c" / "key.json", seed=6)
    assert one.csv.read_bytes() == two.csv.read_bytes() and one.html.read_bytes() == two.html.read_bytes()
    assert one.csv.read_bytes() != other.csv.read_bytes()
    key = read_key(one.key)
    assert {k.a for k in key.items.values()} == {"adapted", "base"}  # positions randomised
    for path in (one.csv, one.html):
        text = path.read_text(encoding="utf-8-sig").lower()
        assert "adapted" not in text and "adapter" not in text  # nothing tells the models apart
        assert not re.search(r"conv\d", text)  # nor the scenario ids the key maps them with
    page = one.html.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Content-Security-Policy" in page
    rows = list(csv.DictReader(io.StringIO(one.csv.read_text(encoding="utf-8-sig"))))
    assert [r["item"] for r in rows] == [str(i) for i in range(1, 11)] and all(
        r["choice"] == "" for r in rows
    )
    assert rows[0]["earlier_messages"].startswith("Instructions: Be kind.\n\nUser: Earlier worry")


def test_unanswered_rows_are_left_out_and_bad_choices_named(tmp_path: Path, capsys) -> None:
    files = write_human_sheet(scenarios(), tmp_path, tmp_path / "key.json", seed=1)
    partial = fill(
        files.csv,
        files.key,
        lambda item, want, a: (
            "" if item in ("2", "7") else ("A" if a == want else "B" if want != "tie" else "tie")
        ),
    )
    assert human_eval.main(["score", str(partial), "--key", str(files.key), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answered"] == 8 and result["unanswered"] == ["2", "7"]
    bad = fill(files.csv, files.key, lambda item, want, a: "maybe" if item == "4" else "A")
    assert human_eval.main(["score", str(bad), "--key", str(files.key)]) == 1
    err = capsys.readouterr().err
    assert "filled.csv: row 5, item 4: choice 'maybe' is not A, B or tie" in err


def test_a_sheet_scored_with_another_jobs_key_is_refused(tmp_path: Path, capsys) -> None:
    small = write_human_sheet(scenarios()[:3], tmp_path / "small", tmp_path / "small" / "key.json", seed=1)
    big = write_human_sheet(scenarios(), tmp_path / "big", tmp_path / "big" / "key.json", seed=1)
    filled = fill(big.csv, big.key)
    assert human_eval.main(["score", str(filled), "--key", str(small.key)]) == 1
    assert "are not in key.json: a different sheet?" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert human_eval.main(["score", str(filled), "--key", str(tmp_path / "junk.json")]) == 1
    assert "junk.json: not a human-eval key" in capsys.readouterr().err


def test_help_describes_the_command(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        human_eval.main(["score", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "the filled-in human_eval_sheet.csv" in out and "--key" in out
