"""The SendSystemError family.

Every error the user can meet says what went wrong and what to do next. The
CLI maps the family onto the exit codes the README documents: user errors exit 1,
temporary failures (database or relay unreachable) exit 75 (EX_TEMPFAIL) so
an MTA or cron simply tries again later.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75


class SendSystemError(Exception):
    """Base of every error SendSystem raises on purpose."""

    exit_code = EXIT_USER


class UserError(SendSystemError):
    """Bad input: an unknown name, a bad CSV row, a missing file."""


class UsageError(SendSystemError):
    """A command-line option has a value it can never take (exit 2, like click's)."""

    exit_code = EXIT_USAGE


class ConfigError(UserError):
    """config.ini or the environment is missing or wrong."""


class TemplateError(UserError):
    """A template does not compile (raised when it is added, not when sending)."""


class ImportRowsError(UserError):
    """A CSV import found bad rows; ``problems`` is [(line_number, reason), ...], the
    first of them (all ``count`` are reported as they are found, not kept)."""

    SHOWN = 50

    def __init__(self, problems: list[tuple[int, str]], total: int,
                 count: int | None = None) -> None:
        self.problems = problems
        self.count = len(problems) if count is None else count
        self.summary = (f"{self.count} of {total} rows are invalid; nothing was imported. "
                        "Fix those lines, or re-run with --skip-invalid to import only the "
                        "good rows.")
        lines = "\n".join(f"  line {line}: {reason}" for line, reason in problems[:self.SHOWN])
        shown = min(len(problems), self.SHOWN)
        more = f"\n  ... and {self.count - shown} more" if self.count > shown else ""
        super().__init__(
            f"{self.count} of {total} rows are invalid; nothing was imported.\n"
            f"{lines}{more}\n"
            "Fix those lines, or re-run with --skip-invalid to import only the good rows."
        )


class SchemaError(SendSystemError):
    """The database schema does not match this version of SendSystem."""


class KeptCountsMismatch(SendSystemError):
    """`counts verify` found kept counts that differ from the message rows."""


class TemporaryError(SendSystemError):
    """Something outside us is down (database, relay): try again later."""

    exit_code = EXIT_TEMPFAIL


class DatabaseUnavailable(TemporaryError):
    """MariaDB cannot be reached."""


class DatabaseConflict(TemporaryError):
    """A deadlock or lock-wait timeout rolled the unit of work back: run it again."""
