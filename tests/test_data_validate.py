"""`python -m lora_worker validate`: a pass/fail line, readable labels, the loss with its fix."""

from __future__ import annotations

import json

from conftest import SAMPLE
from data_builders import system_heavy_dataset

from lora_worker.tools import validate


def test_sample_passes_with_readable_labels(capsys):
    assert validate.main([str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("PASS: ") and "24 conversations" in first
    assert "Pairs without a target" in out and "Length limit: Targets dropped" in out
    assert "Slices: All conversations: Emotional arcs" in out and "couple_conflict_to_alignment" in out
    assert "skipped_null_targets" not in out and "truncated" not in out  # labels, not raw keys


def test_json_output(capsys):
    assert validate.main([str(SAMPLE), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["problems"] == []
    assert summary["pairs"] == 156 and summary["skipped_null_targets"] == 3
    assert summary["tokens_unfolded"] > summary["tokens_total"] > summary["trainable_tokens"] > 0


def test_too_much_loss_fails_with_the_fix_and_passes_with_the_share_raised(tmp_path, capsys):
    f = tmp_path / "heavy.json"
    f.write_text(system_heavy_dataset())
    assert validate.main([str(f), "--max-seq-length", "512"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: a job would refuse")
    assert "25 of 27 targets dropped at max_seq_length 512" in out
    assert "24 fit alone but not after the system prompt" in out and "raise max_seq_length to " in out
    assert "Warnings:" in out  # the summary is still shown, to see what would be lost
    assert validate.main([str(f), "--max-seq-length", "512", "--max-dropped-share", "1"]) == 0
    assert capsys.readouterr().out.startswith("PASS: ")


def test_broken_file_lists_every_problem(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"training_pairs": [{"turn_number": 1, "target_response": 3}]}]}')
    assert validate.main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: ")
    assert "turn 1: current_user_input" in out and "target_response: must be a string or null" in out
    assert validate.main([str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().out
