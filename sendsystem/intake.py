"""Kept only so deployed gunicorn command lines keep working.

They name ``sendsystem.intake:create_app("/etc/sendsystem/config.ini")``,
from before the bounce intake moved to :mod:`sendsystem.bounce.intake` and the
unsubscribe app's database side to :mod:`sendsystem.unsubscribe.service`,
where :func:`create_app` now lives. New code imports from there; this module
re-exports nothing else.
"""

from __future__ import annotations

from .unsubscribe.service import create_app

__all__ = ["create_app"]
