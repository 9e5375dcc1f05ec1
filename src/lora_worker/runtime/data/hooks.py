"""Progress and cancel hooks for the long loops of preprocessing (loading and tokenizing).

A file of a million small conversations takes minutes to tokenize; the caller sees how far it is
through `on_progress(done, total)` and stops it with `should_stop()`, which is asked before every
conversation (a cheap call such as `threading.Event.is_set`) and raises PreprocessingCancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_worker.runtime.data.conversation import PreprocessingCancelled

OnProgress = Callable[[int, int], None]  # (done, total) conversations
ShouldStop = Callable[[], bool]

PROGRESS_EVERY = 200  # conversations between progress calls (the caller throttles its own output)


@dataclass
class Ticker:
    """Counts one loop's conversations, reports progress and honours cancel."""

    stage: str  # "loading" or "tokenizing": named in PreprocessingCancelled
    total: int
    on_progress: OnProgress | None = None
    should_stop: ShouldStop | None = None
    every: int = PROGRESS_EVERY

    def tick(self, done: int) -> None:
        """Call before handling conversation number `done` (0-based) and once more with `total`."""
        if self.should_stop is not None and done < self.total and self.should_stop():
            raise PreprocessingCancelled(self.stage, done, self.total)
        if self.on_progress is not None and (done % self.every == 0 or done == self.total):
            self.on_progress(done, self.total)
