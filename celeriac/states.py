"""Task state names, the sets Celery groups them into, and the one transition rule.

The names, sets and precedence are Celery's, so results written by either
project read the same.  The transition rule is celeriac's own and is the only
place that decides whether a stored state may be replaced: every backend asks
:func:`may_replace` (or enforces the same condition inside its store, atomically).
"""

from __future__ import annotations

PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
REJECTED = "REJECTED"
RETRY = "RETRY"
IGNORED = "IGNORED"

READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, REJECTED, RETRY})
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
ALL_STATES = frozenset({PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED})

#: Lower index = higher precedence.  ``None`` stands for every custom state.
PRECEDENCE: list[str | None] = [
    SUCCESS, FAILURE, None, REVOKED, STARTED, RECEIVED, REJECTED, RETRY, PENDING,
]
_PRECEDENCE_INDEX = {name: i for i, name in enumerate(PRECEDENCE)}
_CUSTOM = _PRECEDENCE_INDEX[None]


def precedence(state: str | None) -> int:
    """Index of ``state`` in :data:`PRECEDENCE`; custom states share the slot of ``None``."""
    return _PRECEDENCE_INDEX.get(state, _CUSTOM)


class state(str):  # noqa: N801 - Celery's public name
    """A state name that compares by precedence: ``state(SUCCESS) > state(STARTED)``."""

    def __gt__(self, other: str) -> bool:  # type: ignore[override]
        return precedence(self) < precedence(other)

    def __ge__(self, other: str) -> bool:  # type: ignore[override]
        return precedence(self) <= precedence(other)

    def __lt__(self, other: str) -> bool:  # type: ignore[override]
        return precedence(self) > precedence(other)

    def __le__(self, other: str) -> bool:  # type: ignore[override]
        return precedence(self) >= precedence(other)


def may_replace(current: str | None, new: str) -> bool:
    """THE transition rule: a stored ready state is final; anything else may be replaced.

    ``current`` is the stored state (``None`` when nothing is stored).  Unlike
    Celery, which protects only SUCCESS and checks it with a separate read, a
    FAILURE or REVOKED is final too.  Backends that can evaluate a condition in
    the store itself (SQL, Lua) apply :data:`READY_STATES` there instead of
    calling this function, so the check and the write are one atomic step.
    """
    return current not in READY_STATES


#: The history states of a task that has not started: sent, or waiting for a retry.
WAITING_STATES = frozenset({PENDING, RETRY})


def is_waiting(stored: str | None, latest: str | None) -> bool:
    """Whether a task has not started (what ``revoke`` may mark REVOKED at once):
    ``stored`` is its stored state, ``latest`` the state of its newest history entry
    (None for none).  A worker writes RECEIVED to the history when it starts a task."""
    return (stored is None or stored in WAITING_STATES) and (
        latest is None or latest in WAITING_STATES)
