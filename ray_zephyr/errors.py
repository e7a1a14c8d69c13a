"""User-facing errors: one readable line, never a traceback.

Errors raised inside Ray tasks come back wrapped (RayTaskError, UserCodeException, ...);
`user_error_in` digs the original `UserError` out so the CLI can print its message alone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad recipe, bad file, bad row); its message is the whole story."""


class DataError(UserError):
    """Bad input data: names the source, the row and the reason."""


class DataStallError(UserError):
    """The data pipeline produced nothing for too long (see `ray_zephyr.prefetch.iter_with_stall_timeout`)."""


def user_error_in(exc: BaseException) -> UserError | None:
    """Find a UserError in `exc`'s chain of causes, including Ray's task-error wrappers."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # Ray's RayTaskError(DataError) carries the original here
        if isinstance(e, UserError) and not isinstance(cause, BaseException):
            return e
        stack += [e.__cause__, e.__context__, cause]
    return None


class _HideUserErrorTracebacks(logging.Filter):
    """Ray Data logs a traceback for every failed task; for a UserError the one line we print says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray also logs plain error lines from inside its `except` block: the exception in hand is the one.
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or user_error_in(exc) is None


def run_cli(main: Callable[[], object]) -> None:
    """Run a command's main(); a UserError anywhere in the chain becomes one line on stderr and exit 2."""
    import ray.data  # noqa: F401 - sets up Ray's log handlers, which the filter must sit on

    for name in ("ray", "ray.data"):  # on the handlers, to see the records of child loggers too
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_HideUserErrorTracebacks())
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:  # noqa: BLE001 - the whole point is to catch and translate
        if isinstance(exc, SystemExit):
            raise
        err = user_error_in(exc)
        if err is None:
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)  # Ray appends retry hints
        sys.exit(2)
