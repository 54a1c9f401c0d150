"""Renderings of the facts ``sendsystem.stats`` gathers: ``text`` for ``status`` and ``stats``
in a terminal or cron mail, ``html`` for ``stats --html``'s self-contained file.

Pure functions over those dicts, no database access. Anything that came from a
customer or a remote server is cleaned (text) or escaped (html) where it is
interpolated; ``html`` reuses ``text``'s number formatting so both say the same.
"""
