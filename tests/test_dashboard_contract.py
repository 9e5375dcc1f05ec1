"""The studio's seed dashboard stores the worker's events unchanged: replayed against its real tables.

A real PostgreSQL server holds the contract file's tables; every event the Reporter emits for a
synthetic job goes, as the exact webhook body, through a faithful port of the dashboard's
`handleWebhook` (tests/seed_dashboard.py) with no constraint error.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from pathlib import Path

import pytest
import seed_dashboard
from seed_dashboard import (
    SHARED_CONTRACT,
    VENDORED_CONTRACT,
    PostgrestError,
    contract_sql,
    handle_webhook,
)

from lora_worker.runtime.events.event import STATUSES, TrainingMetrics
from lora_worker.runtime.events.progress import CostMeter, Reporter
from lora_worker.runtime.events.signing import encode_event

psycopg = seed_dashboard.require_psycopg()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Wire:
    """A channel that keeps each event as the dashboard receives it: the body parsed from its bytes."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []

    def send(self, event, *, kind):
        self.payloads.append(json.loads(encode_event(event)))

    def close(self, timeout_s):
        return True


def synthetic_job(job_id: str, *, outcome: str = "completed", steps: int = 24) -> list[dict]:
    """The events of a whole job as the Reporter emits them, with the Trainer's callback order
    (evaluation at a step before that step's log record) and realistic numbers."""
    clock, wire = Clock(), Wire()
    r = Reporter(job_id, meter=CostMeter(4.18, clock), channels=[wire], min_interval_s=10, clock=clock)
    r.stage("queued")
    r.stage("fetching_dataset")
    r.stage("preprocessing", dataset={"conversations": 24, "targets": 264, "dropped": {"too_long": 3}})
    r.stage("resolving_model")
    r.stage("preprocessing", plan={"total_steps": steps, "tokens_to_train": 98_304}, total_steps=steps)
    r.stage("downloading_model")
    for done in range(0, 141, 47):
        clock.t += 30
        r.progress(download={"bytes_done": done * 10**9, "bytes_total": 141 * 10**9}, force=True)
    r.stage("model_loading")
    r.stage("model_loaded", model={"trainable_params": 207_093_760, "device": "cuda", "gpu": "H100"})
    r.stage("baseline_eval")
    r.baseline(1.7324)
    r.stage("training")
    warmup = 2
    for step in range(1, steps + 1):
        clock.t += 4.0
        if step in (12, 24) and outcome == "completed":
            r.evaluation(step=step, eval_loss=1.7 - step / 100)
        if outcome != "completed" and step == 10:
            break
        lr = 2e-4 * min(1.0, step / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps)))
        record = {
            "loss": 2.5 * math.exp(-step / 20) + 0.05 * (step % 3),
            "learning_rate": lr,
            "grad_norm": 0.31 + 0.7 / step,
            "epoch": round(step * 3 / steps, 4),
        }
        r.progress(step=step, metrics=record, tokens_seen=step * 4096, eta_seconds=(steps - step) * 4.0)
    if outcome == "failed":
        r.stage("failed", error_message="non-finite training loss at step 10 (NaN); the job stops here")
        return wire.payloads
    if outcome == "cancelled":
        r.stage("cancelled", error_message="cancelled during training; checkpoint at step 10 kept")
        return wire.payloads
    for name in ("evaluating", "saving", "reporting", "uploading"):
        r.stage(name)
    r.stage(
        "completed",
        lora_artifact_path=f"jobs/{job_id}/adapter",
        verdict={"verdict": "improved", "reason": "held-out loss fell 2.3 %"},
        warnings=["3 targets dropped: longer than max_seq_length"],
        output={"status": "completed", "lora_artifact_path": f"jobs/{job_id}/adapter"},
    )
    return wire.payloads


def history(conn, job_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT step, epoch, loss, learning_rate, grad_norm FROM training_metrics_history "
        "WHERE training_job_id = %s ORDER BY step, recorded_at",
        (job_id,),
    ).fetchall()


def job_row(conn, job_id: str) -> dict:
    cur = conn.execute("SELECT * FROM training_jobs WHERE id = %s", (job_id,))
    names = [d.name for d in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def close_to(stored: Decimal | None, sent: float | None, scale: int) -> bool:
    """NUMERIC(p, scale) keeps `scale` decimals, rounded: what was sent, to that precision."""
    if sent is None:
        return stored is None
    return stored is not None and abs(Decimal(str(sent)) - stored) <= Decimal(5) * Decimal(10) ** -(scale + 1)


# ------------------------------------------------------------------------------------- the contract


def test_the_vendored_contract_is_the_studios(tmp_path: Path):
    if not SHARED_CONTRACT.is_file():
        pytest.skip(f"{SHARED_CONTRACT} is not beside this checkout; the vendored copy is used")
    assert VENDORED_CONTRACT.read_text() == SHARED_CONTRACT.read_text()


def test_status_values_are_the_check_list_and_metrics_are_history_columns(dashboard_db):
    conn = dashboard_db.conn
    (check,) = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'training_jobs'::regclass AND contype = 'c'"
    ).fetchone()
    assert tuple(re.findall(r"'(\w+)'::text", check)) == STATUSES
    columns = {
        name
        for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'training_metrics_history'"
        ).fetchall()
    }
    assert set(TrainingMetrics.model_fields) <= columns
    assert any("CREATE TABLE training_metrics_history" in block for block in contract_sql())


# ------------------------------------------------------------------------------------- replays


def test_a_completed_job_is_stored_without_a_constraint_error(dashboard_db):
    conn, job_id = dashboard_db.conn, dashboard_db.job_id
    payloads = synthetic_job(job_id)
    statuses_seen = set()
    for payload in payloads:
        handle_webhook(conn, payload)
        statuses_seen.add(job_row(conn, job_id)["status"])
    assert statuses_seen == {"queued", "preprocessing", "model_loaded", "training", "completed"}

    sent = [(p["step"], p["metrics"]) for p in payloads if p.get("metrics") and p.get("step")]
    rows = history(conn, job_id)
    assert [row[0] for row in rows] == [step for step, _ in sent]  # one row per event with metrics
    assert len({row[0] for row in rows}) == len(rows)  # no step twice
    for (_, epoch, loss, lr, grad_norm), (_, metrics) in zip(rows, sent, strict=True):
        assert close_to(epoch, metrics.get("epoch"), 2)
        assert close_to(loss, metrics.get("loss"), 6)
        assert close_to(lr, metrics.get("learning_rate"), 8)
        assert close_to(grad_norm, metrics.get("grad_norm"), 6)
    # the evaluation steps' rows hold their own step's training numbers
    for p in payloads:
        if p["stage"] == "training" and p.get("evaluation", {}).get("step") == p["step"]:
            assert p.get("metrics"), f"the event for eval step {p['step']} carries no training metrics"
    assert rows[-1][0] == 24  # the last step reaches the chart although the rate limit held it

    row = job_row(conn, job_id)
    assert row["status"] == "completed" and row["lora_artifact_path"] == f"jobs/{job_id}/adapter"
    assert row["completed_at"] is not None and row["error_message"] is None
    assert (row["current_step"], row["total_steps"]) == (24, 24)
    assert row["metrics"] == sent[-1][1]  # jsonb: the last training record sent


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_a_failed_or_cancelled_job_is_stored_with_its_reason(dashboard_db, outcome):
    conn, job_id = dashboard_db.conn, dashboard_db.job_id
    for payload in synthetic_job(job_id, outcome=outcome):
        handle_webhook(conn, payload)
    row = job_row(conn, job_id)
    assert row["status"] == outcome and row["lora_artifact_path"] is None
    assert row["error_message"].startswith(
        "non-finite" if outcome == "failed" else "cancelled during training"
    )
    # the seed handler stamps completed_at for completed and failed only
    assert (row["completed_at"] is not None) == (outcome == "failed")
    steps = [r[0] for r in history(conn, job_id)]
    assert steps == sorted(set(steps)) and steps[-1] == 9  # the last record goes out before the final event


# ------------------------------------------------------------------------------------- the port is faithful


def test_the_port_rejects_what_the_seed_dashboard_rejects(dashboard_db):
    conn, job_id = dashboard_db.conn, dashboard_db.job_id
    with pytest.raises(psycopg.errors.CheckViolation):  # a stage name as status
        handle_webhook(conn, {"job_id": job_id, "status": "model_loading", "step": 0})
    with pytest.raises(PostgrestError, match="eval_loss"):  # a metric the history table has no column for
        handle_webhook(
            conn, {"job_id": job_id, "status": "training", "step": 3, "metrics": {"eval_loss": 1.0}}
        )
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # job ids are the dashboard's UUIDs
        handle_webhook(conn, {"job_id": "local_test", "status": "training"})
    # JavaScript truthiness: step 0 inserts no history row, an empty metrics object still counts
    handle_webhook(conn, {"job_id": job_id, "status": "training", "step": 0, "metrics": {"loss": 1.0}})
    handle_webhook(conn, {"job_id": job_id, "status": "training", "step": 2, "metrics": {}})
    assert [r[0] for r in history(conn, job_id)] == [2]


@pytest.mark.parametrize(
    ("column", "fits", "overflows"),
    [
        ("epoch", 99.99, 100.0),  # NUMERIC(4,2)
        ("loss", 9999.99, 10000.0),  # NUMERIC(10,6)
        ("grad_norm", 9999.99, 10000.0),  # NUMERIC(10,6)
        ("learning_rate", 99.0, 100.0),  # NUMERIC(10,8)
    ],
)
def test_history_columns_overflow_where_the_schema_says(dashboard_db, column, fits, overflows):
    """The seed schema's ranges: a record past them loses its history row (see docs/webhooks.md)."""
    conn, job_id = dashboard_db.conn, dashboard_db.job_id
    handle_webhook(conn, {"job_id": job_id, "status": "training", "step": 1, "metrics": {column: fits}})
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        handle_webhook(
            conn, {"job_id": job_id, "status": "training", "step": 2, "metrics": {column: overflows}}
        )
