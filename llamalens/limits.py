"""Time bounds on pure-Python work that user input controls and nothing else stops: a regular expression
that backtracks for ever (`--outcome`), a chat template that loops for ever.

    with time_limit(2.0, "--outcome 'x'", "simplify it"):
        re.search(...)        # TimeLimitExceeded (an InvalidInput naming the fix) after 2 s

The bound is an interval timer (SIGALRM): Python checks for signals inside re's matching loop and between
bytecodes, so it stops both. Signal handlers can only be set in the main thread; elsewhere (a notebook's
worker thread) the work runs unbounded, as before. A limit already running (one nested inside another)
is kept: the inner block only adds its own check.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from llamalens.errors import InvalidInput


class TimeLimitExceeded(InvalidInput):
    """Work on user input ran past its time limit."""


class _Expired(BaseException):
    """Raised by the timer inside the bounded block (BaseException: a bare `except Exception` in user-facing
    code cannot swallow it)."""


@contextmanager
def time_limit(seconds: float, what: str, fix: str):
    """Run the block for at most `seconds`; TimeLimitExceeded("{what} took more than N s; {fix}") after that."""
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _Expired()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise TimeLimitExceeded(f"{what} took more than {seconds:g} s; {fix}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
