"""One part's database outage: a warning when it starts, a line when it ends, and a bounded
backoff in between.

The cap is low on purpose: after an outage of any length the part is back within a few
seconds of the database (a 30 s cap once made recovery hinge on the listener's reconnect
waking the claim loop). A few connection attempts per worker every few seconds cost a
recovering server nothing; the retries between the two lines are logged at debug level,
so a long outage is two lines per part, not one per attempt.
"""

from __future__ import annotations

import logging
import time

from worker.backoff import retry_delay
from worker.logs import one_line

RETRY_CAP = 5.0


class Outage:
    def __init__(
        self, log: logging.Logger, what: str, *, base: float = 0.5, cap: float = RETRY_CAP
    ) -> None:
        self._log = log
        self._what = what
        self._base = base
        self._cap = cap
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
                "%s: database unavailable (%s)%s; retrying every <= %gs until it is back",
                self._what,
                reason,
                detail,
                self._cap,
            )
        else:
            self._log.debug("%s: still unavailable (%s); retry in %.1fs", self._what, reason, delay)
        return delay

    def recovered(self) -> None:
        """The database answered: close the outage (one line) if there was one."""
        if self.failures:
            self._log.info(
                "%s: database available again after %.1fs (%d failed attempts)",
                self._what,
                time.monotonic() - self._since,
                self.failures,
            )
            self.failures = 0
