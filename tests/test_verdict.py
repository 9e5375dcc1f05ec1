"""The verdict is decided from the numbers, with a stated noise threshold and interval."""

from __future__ import annotations

import pytest

from lora_worker.runtime.evaluation.verdict import NOISE_THRESHOLD, decide


def per_conv(values):
    return {f"c{i}": v for i, v in enumerate(values)}


def test_lower_held_out_loss_on_every_conversation_is_improved():
    out = decide(
        2.0,
        1.8,
        per_conversation_before=per_conv([2.0, 2.1, 1.9, 2.0]),
        per_conversation_after=per_conv([1.8, 1.85, 1.75, 1.8]),
    )
    assert out.verdict == "improved"
    assert out.delta == pytest.approx(-0.2) and out.relative_delta == pytest.approx(-0.1)
    assert out.interval_95 is not None and out.interval_95[1] < 0
    assert out.conversations == 4


def test_a_change_inside_the_noise_threshold_is_unchanged():
    out = decide(6.494497, 6.494497)
    assert out.verdict == "unchanged" and "noise threshold" in out.reason
    assert decide(2.0, 2.0 * (1 + NOISE_THRESHOLD / 2)).verdict == "unchanged"


def test_an_interval_that_includes_zero_is_unchanged():
    out = decide(
        2.0,
        1.9,
        per_conversation_before=per_conv([2.0, 2.0, 2.0, 2.0]),
        per_conversation_after=per_conv([1.5, 2.4, 1.6, 2.3]),
    )
    assert out.verdict == "unchanged" and "includes no change" in out.reason


def test_higher_loss_is_worse():
    out = decide(
        2.0, 2.3, per_conversation_before=per_conv([2.0, 2.0]), per_conversation_after=per_conv([2.3, 2.3])
    )
    assert out.verdict == "worse"


def test_no_held_out_data_is_not_measured():
    assert decide(None, None).verdict == "not_measured"
    assert decide(2.0, None).verdict == "not_measured"
