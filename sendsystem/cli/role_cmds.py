"""The four cron-started role processes."""

from __future__ import annotations

import importlib
import socket

import click

from ..runner import Runner, RunOptions
from . import Context, cli, pass_ctx

ROLES = {
    "sort-balancer": "sendsystem.roles.sort_balancer:SortBalancer",
    "sort-worker": "sendsystem.roles.sort_worker:SortWorker",
    "send-balancer": "sendsystem.roles.send_balancer:SendBalancer",
    "send-worker": "sendsystem.roles.send_worker:SendWorker",
}


def _role_class(command: str) -> type[Runner]:
    module, _, name = ROLES[command].partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _make(command: str, help_text: str) -> None:
    @cli.command(command, help=help_text)
    @click.option("--once", is_flag=True, help="Drain what is there, then exit.")
    @click.option("--name", default=None,
                  help="Instance name (default: the host name); several instances of one role "
                       "may run on one server, each with its own lock. Letters, digits, "
                       "'-', '_' and '.', at most 64, not starting with '.'.")
    @click.option("--max-runtime", type=float, metavar="SECONDS",
                  help="Stop gracefully after this long.")
    @click.option("--max-rate", type=float, metavar="N",
                  help="At most N messages per second (workers).")
    @pass_ctx
    def command_fn(ctx: Context, once: bool, name: str | None, max_runtime: float | None,
                   max_rate: float | None) -> None:
        options = RunOptions(name=name if name is not None else socket.gethostname(),
                             once=once, max_runtime=max_runtime, max_rate=max_rate,
                             default_name=name is None)
        code = _role_class(command)(ctx.config, options).run()
        raise click.exceptions.Exit(code)


_make("sort-balancer", "Assign queued messages to sort workers (one active per cluster).")
_make("sort-worker", "Merge subscriber data into newsletters (the SortingSystem).")
_make("send-balancer", "Assign merged messages to send workers (one active per cluster).")
_make("send-worker", "Deliver merged messages over SMTP (the SendingSystem).")
