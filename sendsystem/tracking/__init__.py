"""Opt-in open and click tracking.

* :mod:`.tokens` -- short signed tokens for ``/c/<token>`` and ``/o/<token>``.
* :mod:`.links` -- finding and rewriting the links of a rendered message (render child).
* :mod:`.machine` -- the pure rule that tells machine hits from human ones.
* :mod:`.recorder` -- the web app's batched, spooled writer of hits.
* :mod:`.web` -- the ``/c/`` and ``/o/`` routes, mounted beside the unsubscribe app.
* :mod:`.report` -- what ``stats`` shows, and what ``purge`` folds into a summary.
"""
