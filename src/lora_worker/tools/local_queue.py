"""The local endpoint's queue: its jobs and workers, in memory, with RunPod's queue semantics.

A job whose worker goes silent (or exits) goes back to the front of the queue with the same id; a
post from a worker that no longer holds the job, or after a final status, is dropped; a job past its
policy's execution timeout is TIMED_OUT and its worker told to stop. Times are time.monotonic()
seconds unless a field says otherwise; the HTTP side is in local_endpoint.py.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


@dataclass
class JobRecord:
    id: str
    input: Any
    webhook: str | None
    submitted: float  # time.monotonic() seconds, like every time below
    execution_timeout_s: float | None = None
    status: str = "IN_QUEUE"
    worker_id: str | None = None
    first_started: float | None = None
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: Any = None
    stream: list[Any] = field(default_factory=list)
    retries: int = 0  # times a dead worker's job went back to the queue
    progress_updates: int = 0
    ignored_posts: int = 0  # late or stale posts dropped (after a final status, or from a former holder)

    def view(self, now: float) -> dict:
        """The body of GET /status/<id>, in the public API's shape (times in milliseconds)."""
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.first_started is not None:
            out["delayTime"] = int((self.first_started - self.submitted) * 1000)
        if self.started is not None:
            out["executionTime"] = int(((self.finished or now) - self.started) * 1000)
        if self.worker_id:
            out["workerId"] = self.worker_id
        if self.output is not None:
            out["output"] = self.output
        if self.error is not None:
            out["error"] = self.error
        if self.retries:
            out["retries"] = self.retries
        return out


@dataclass
class WorkerRecord:
    id: str
    last_seen: float
    stop: list[str] = field(default_factory=list)  # job ids waiting for its next job-stop poll
    unhealthy: str | None = None
    gone: bool = False


class QueueState:
    """The endpoint's jobs and workers; every method is thread-safe (one lock, one condition)."""

    def __init__(self, *, requeue_after_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.requeue_after_s = requeue_after_s
        self.clock = clock
        self.jobs: dict[str, JobRecord] = {}
        self.queue: deque[str] = deque()
        self.workers: dict[str, WorkerRecord] = {}
        self.cond = threading.Condition()
        self.closing = False
        # Called with (job, its status view) when a job reaches a final status.
        self.on_final: list[Callable[[JobRecord, dict], Any]] = []

    # ------------------------------------------------------------------ dashboard side

    def submit(self, job_input: Any, *, webhook: str | None = None, policy: dict | None = None) -> dict:
        timeout_ms = policy.get("executionTimeout") if isinstance(policy, dict) else None
        with self.cond:
            job = JobRecord(
                id=f"{uuid.uuid4()}-local",
                input=job_input,
                webhook=webhook,
                submitted=self.clock(),
                execution_timeout_s=float(timeout_ms) / 1000 if timeout_ms else None,
            )
            self.jobs[job.id] = job
            self.queue.append(job.id)
            self.cond.notify_all()
            log.info("job %s queued", job.id)
            return {"id": job.id, "status": job.status}

    def status(self, job_id: str) -> dict | None:
        with self.cond:
            self._sweep()
            job = self.jobs.get(job_id)
            return job.view(self.clock()) if job else None

    def wait_final(self, job_id: str, timeout_s: float) -> dict | None:
        """Block until the job is final or timeout_s passes (for /runsync); returns its status."""
        deadline = self.clock() + timeout_s
        with self.cond:
            while True:
                self._sweep()
                job = self.jobs.get(job_id)
                if job is None:
                    return None
                left = deadline - self.clock()
                if job.status in FINAL or left <= 0 or self.closing:
                    return job.view(self.clock())
                self.cond.wait(min(left, 1.0))  # wake each second to sweep dead workers

    def cancel(self, job_id: str) -> dict | None:
        with self.cond:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.status == "IN_QUEUE":
                self.queue.remove(job_id)
                self._finish(job, "CANCELLED")
            elif job.status == "IN_PROGRESS":
                worker = self.workers.get(job.worker_id or "")
                if worker is not None:
                    worker.stop.append(job_id)  # delivered on the worker's job-stop long-poll
                self._finish(job, "CANCELLED")
            self.cond.notify_all()
            return {"id": job.id, "status": job.status}

    def purge_queue(self) -> dict:
        with self.cond:
            removed = list(self.queue)
            for job_id in removed:
                self._finish(self.jobs[job_id], "CANCELLED")
            self.queue.clear()
            return {"removed": len(removed), "status": "completed"}

    def health(self) -> dict:
        with self.cond:
            self._sweep()
            by_status = [j.status for j in self.jobs.values()]
            holders = {j.worker_id for j in self.jobs.values() if j.status == "IN_PROGRESS"}
            live = [w for w in self.workers.values() if not w.gone]
            return {
                "jobs": {
                    "completed": by_status.count("COMPLETED"),
                    "failed": by_status.count("FAILED"),
                    "inProgress": by_status.count("IN_PROGRESS"),
                    "inQueue": by_status.count("IN_QUEUE"),
                    "retried": sum(j.retries for j in self.jobs.values()),
                },
                "workers": {
                    "idle": sum(1 for w in live if w.id not in holders and not w.unhealthy),
                    "running": sum(1 for w in live if w.id in holders),
                    "unhealthy": sum(1 for w in live if w.unhealthy),
                },
            }

    # ------------------------------------------------------------------ worker side

    def take(self, worker_id: str, *, job_in_progress: bool, wait_s: float, batch: int = 1) -> list[dict]:
        """Hand the worker up to `batch` queued jobs, waiting up to wait_s for one (long-poll)."""
        deadline = self.clock() + wait_s
        with self.cond:
            worker = self._seen(worker_id)
            if not job_in_progress:
                # The worker says it runs nothing, so a job we think it holds was lost with the process
                # (a restarted container keeps its pod id): run it again.
                for job in self.jobs.values():
                    if job.status == "IN_PROGRESS" and job.worker_id == worker_id:
                        self._requeue(job, "its worker asked for new work without finishing it")
            while True:
                self._sweep()
                if self.queue or self.closing or worker.gone or self.clock() >= deadline:
                    break
                self.cond.wait(min(deadline - self.clock(), 1.0))
            taken: list[dict] = []
            # A worker declared gone while its poll was held gets nothing: its process is probably dead.
            while self.queue and len(taken) < batch and not self.closing and not worker.gone:
                job = self.jobs[self.queue.popleft()]
                now = self.clock()
                job.status, job.worker_id, job.started, job.finished = "IN_PROGRESS", worker.id, now, None
                job.first_started = job.first_started or now
                job.output = job.error = None
                taken.append({"id": job.id, "input": job.input})
                log.info("job %s taken by worker %s", job.id, worker.id)
            self._still_there(worker)
            return taken

    def handback(self, worker_id: str, job_ids: list[str]) -> None:
        """A take response never reached the worker (it hung up): those jobs go back to the queue."""
        with self.cond:
            for job_id in job_ids:
                job = self.jobs.get(job_id)
                if job and job.status == "IN_PROGRESS" and job.worker_id == worker_id:
                    self._requeue(job, "the job-take response could not be delivered")

    def post(self, worker_id: str, job_id: str, body: Any, *, stream: bool = False) -> dict:
        """A job-done or job-stream POST: a progress update, a stream chunk, or the final result."""
        with self.cond:
            self._seen(worker_id)
            job = self.jobs.get(job_id)
            if job is None:
                return {"ignored": "unknown job"}
            if job.status != "IN_PROGRESS" or job.worker_id != worker_id:
                # The real service drops these too: a final status is final, and a requeued job belongs
                # to its new worker.
                job.ignored_posts += 1
                why = f"job is {job.status}" if job.status != "IN_PROGRESS" else "worker no longer holds it"
                log.info("job %s: ignored a post from worker %s (%s)", job_id, worker_id, why)
                return {"ignored": why}
            body = body if isinstance(body, dict) else {"output": body}
            if stream:
                job.stream.append(body.get("output"))
            elif body.get("status") == "IN_PROGRESS":
                job.output = body.get("output")
                job.progress_updates += 1
            elif body.get("error") is not None:
                job.output = body.get("output")
                job.error = body["error"]
                self._finish(job, "FAILED")
            else:
                job.output = body.get("output")
                self._finish(job, "COMPLETED")
            self.cond.notify_all()
            return {"status": job.status}

    def stop_signals(self, worker_id: str, wait_s: float) -> list[str]:
        deadline = self.clock() + wait_s
        with self.cond:
            worker = self._seen(worker_id)
            while not worker.stop and not self.closing and not worker.gone and self.clock() < deadline:
                self._sweep()
                self.cond.wait(min(deadline - self.clock(), 1.0))
            ids, worker.stop = worker.stop, []
            self._still_there(worker)
            return ids

    def ping(self, worker_id: str, params: dict[str, str]) -> None:
        with self.cond:
            worker = self._seen(worker_id)
            if params.get("status") == "unhealthy":  # a failed fitness check, reported before exiting
                worker.unhealthy = f"{params.get('check')}: {params.get('reason')}"
                log.warning("worker %s reported unhealthy: %s", worker_id, worker.unhealthy)

    def worker_gone(self, worker_id: str) -> None:
        """The supervisor saw the process exit: requeue its job now instead of after the timeout."""
        with self.cond:
            worker = self.workers.get(worker_id)
            if worker is not None:
                worker.gone = True
            for job in self.jobs.values():
                if job.status == "IN_PROGRESS" and job.worker_id == worker_id:
                    self._requeue(job, "its worker process exited")
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    # ------------------------------------------------------------------ internals (lock held)

    def _seen(self, worker_id: str) -> WorkerRecord:
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerRecord(worker_id, self.clock())
            log.info("worker %s connected", worker_id)
        worker.last_seen, worker.gone = self.clock(), False
        return worker

    def _still_there(self, worker: WorkerRecord) -> None:
        # The end of a held poll: the worker was there when it began. A request that outlives its
        # (killed) client must not bring a worker declared gone back to life; its next request will.
        if not worker.gone:
            worker.last_seen = self.clock()

    def _sweep(self) -> None:
        now = self.clock()
        for worker in self.workers.values():
            if not worker.gone and now - worker.last_seen > self.requeue_after_s:
                worker.gone = True
                log.warning("worker %s silent for %.0f s: gone", worker.id, now - worker.last_seen)
        for job in self.jobs.values():
            if job.status != "IN_PROGRESS":
                continue
            worker = self.workers.get(job.worker_id or "")
            if worker is None or worker.gone:
                self._requeue(job, f"worker {job.worker_id} stopped answering")
            elif job.execution_timeout_s and now - (job.started or now) > job.execution_timeout_s:
                worker.stop.append(job.id)
                self._finish(job, "TIMED_OUT")

    def _requeue(self, job: JobRecord, why: str) -> None:
        log.warning("job %s back to the queue: %s", job.id, why)
        job.status, job.worker_id, job.started, job.output = "IN_QUEUE", None, None, None
        job.retries += 1
        self.queue.appendleft(job.id)  # it was first in line once; it goes first again
        self.cond.notify_all()

    def _finish(self, job: JobRecord, status: str) -> None:
        job.status, job.finished = status, self.clock()
        log.info("job %s %s", job.id, status)
        self.cond.notify_all()  # /runsync waiters, and a job-stop poll when a stop signal was queued
        view = job.view(job.finished)
        for callback in self.on_final:
            callback(job, view)
