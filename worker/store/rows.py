"""What the store's reads return: the health read (``DbHealth``), the keys a dead intent
halts, and one purge window's result. Plain values; worker/store/queries.py builds them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DbHealth:
    """The database side, from the one cheap health query (see worker/store/sql/health.sql)."""

    # status = 'pending', in three parts: run_at reached, run_at later, held behind their
    # ordering key's head (ordering_held); each capped at count_cap.
    pending_due: int
    pending_later: int
    processing: int
    dead: int
    count_cap: int  # counts stop here: a count equal to it means "at least"
    oldest_due_seconds: float | None  # how long the longest-waiting due intent has waited
    notify_queue_usage: float  # pg_notification_queue_usage(), 0..1
    idle_workers: int  # workers waiting for a notification (idle_worker rows)
    live_tuples: int | None
    dead_tuples: int | None
    last_autovacuum_seconds: float | None  # age of the last (auto)vacuum of the intent table
    table_bytes: int | None
    # What holds back the xmin horizon (vacuum cannot remove what it may still see): the
    # holder furthest behind. Its age (None for a replication slot), its pid (a slot's active
    # one, none for a prepared transaction), its name: application_name, slot name or gid.
    oldest_xact_seconds: float | None
    oldest_xact_pid: int | None
    oldest_xact_application: str | None
    halted_keys: int = 0  # ordering keys held up by a dead intent (capped like the counts)
    oldest_halted_key: str | None = None
    oldest_halted_seconds: float | None = None  # since that dead head was created
    pending_held: int = 0
    server: str | None = None  # the server the pool is on: "host:port (primary)"
    horizon_kind: str | None = None  # 'transaction', 'replication slot', 'prepared transaction'
    horizon_state: str | None = None  # pg_stat_activity.state, or a slot's (in)active
    horizon_xids: int | None = None  # how far behind it is, in transaction ids
    index_bytes: int | None = None  # the intent table's indexes (pg_indexes_size)

    @property
    def pending(self) -> int:
        return self.pending_due + self.pending_later + self.pending_held

    @property
    def pending_capped(self) -> bool:
        """A part of ``pending`` stopped at the cap: the total is "at least"."""
        return max(self.pending_due, self.pending_later, self.pending_held) >= self.count_cap


@dataclass(frozen=True, slots=True)
class HaltedKeys:
    """Ordering keys halted by a dead intent, and the oldest of them."""

    keys: int
    held_intents: int  # pending intents waiting behind them
    oldest_id: int | None
    oldest_key: str | None
    oldest_kind: str | None
    oldest_error: str | None
    oldest_age: float | None  # seconds since that dead intent was created


@dataclass(frozen=True, slots=True)
class PurgeBatch:
    """One window of the purge query (worker/store/sql/admin.sql)."""

    got: bool  # the statement ran (False: another deleter held the retention lock)
    sent: int  # deleted, by state
    dead: int
    examined: int  # rows of the window
    last_id: int  # where the next window starts
    first_kept: int | None  # the lowest id of the window still there (None: all deleted)
    young: bool  # every row of the window is newer than the cutoffs
    limit: int

    @property
    def deleted(self) -> int:
        return self.sent + self.dead

    @property
    def last(self) -> bool:
        """Nothing further to look at: the end of the table, or rows too new to go."""
        return not self.got or self.examined < self.limit or self.young
