"""One part's outage (the database, or a sink's broker): a warning when it starts, a line
when it ends, and a bounded backoff in between.

The cap is low on purpose: after an outage of any length the part is back within a few
seconds of the database (a 30 s cap once made recovery hinge on the listener's reconnect
waking the claim loop). A few connection attempts per worker every few seconds cost a
recovering server nothing; the retries between the two lines are logged at debug level,
so a long outage is two lines per part, not one per attempt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from worker.backoff import retry_delay
from worker.logs import one_line
from worker.units import fmt_duration

RETRY_CAP = 5.0


@dataclass(frozen=True, slots=True)
class Words:
    """How an outage is told: when it starts and when it ends (``str.format`` fields: what,
    reason, detail, cap; what, after, after_text, failures)."""

    down: str
    back: str
    back_level: int = logging.INFO


DATABASE = Words(
    "{what}: database unavailable ({reason}){detail}; retrying every <= {cap:g}s until it is back",
    "{what}: database available again after {after:.1f}s ({failures} failed attempts)",
)
# A warning when it is back too, so that it replaces "down" as the dashboard's last warning.
BROKER = Words(
    "{what} is down ({reason}){detail}; reconnecting with backoff (up to {cap:g}s apart), its "
    "intents are retried meanwhile",
    "{what} is back after {after_text} ({failures} failed connects)",
    logging.WARNING,
)


class Outage:
    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        base: float = 0.5,
        cap: float = RETRY_CAP,
        words: Words = DATABASE,
    ) -> None:
        self._log = log
        self.what = what
        self._base = base
        self._cap = cap
        self._words = words
        self.failures = 0
        self._since = 0.0

    def failed(self, error: BaseException | str, detail: str = "") -> float:
        """Count one failure (logged if it starts an outage); the delay before the next try."""
        self.failures += 1
        delay = retry_delay(self.failures, base=self._base, cap=self._cap)
        # str() of a TimeoutError is empty; one_line names it
        reason = error if isinstance(error, str) else one_line(error)
        if self.failures == 1:
            self._since = time.monotonic()
            self._log.warning(
                self._words.down.format(what=self.what, reason=reason, detail=detail, cap=self._cap)
            )
        else:
            self._log.debug("%s: still unavailable (%s); retry in %.1fs", self.what, reason, delay)
        return delay

    def recovered(self) -> None:
        """It answered: close the outage (one line) if there was one."""
        if self.failures:
            after = time.monotonic() - self._since
            self._log.log(
                self._words.back_level,
                self._words.back.format(
                    what=self.what,
                    after=after,
                    after_text=fmt_duration(after),
                    failures=self.failures,
                ),
            )
            self.failures = 0
