"""The `sendsystem` command line (click).

Command names are a stable interface (crontabs and scripts call them).
Every command parses the config once and passes it down; errors from the
SendSystemError family print one clear line and exit with their code (1 user
error, 75 try again later); click's usage errors exit 2.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..config import Config, load_config
from ..db import Database
from ..errors import SendSystemError

log = logging.getLogger(__name__)


@dataclass
class Context:
    config_path: str | None
    _config: Config | None = None
    _opened: list[Database] = field(default_factory=list)

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def db(self, retry_for: float = 10.0) -> Database:
        """A database handle, closed when the command ends (see :meth:`close`)."""
        database = Database(self.config.database, retry_for=retry_for)
        self._opened.append(database)
        return database

    def close(self) -> None:
        """Close every connection a command opened.

        Without it the process exits with its socket open and MariaDB logs
        "Aborted connection" (and counts Aborted_clients) for each `status`
        or `check` a cron job runs. click calls this when the command's
        context closes, on success and on error alike.
        """
        while self._opened:
            self._opened.pop().close()


pass_ctx = click.make_pass_decorator(Context)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="SENDSYSTEM_CONFIG", help="config.ini (default ./config.ini).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.version_option(package_name="sendsystem")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """SendSystem: distributed, load-balanced bulk mail sender."""
    setup_logging(log_level)
    ctx.obj = Context(config_path)
    ctx.call_on_close(ctx.obj.close)


def run(argv: list[str] | None = None) -> int:
    """Run the command line; the exit status (0, 1, 2 or 75; see the README)."""
    from . import (  # noqa: F401 - registers commands
        admin_cmds,
        bounce_cmds,
        dkim_cmds,
        monitor_cmds,
        ops_cmds,
        retention_cmds,
        role_cmds,
        subscriber_cmds,
    )
    try:
        # Without standalone mode click returns (not raises) a command's Exit code.
        result = cli.main(args=argv, prog_name="sendsystem", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except SendSystemError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code


def main() -> None:
    sys.exit(run())


def path_arg(**kw: object) -> click.Path:
    return click.Path(path_type=Path, **kw)  # type: ignore[arg-type]
