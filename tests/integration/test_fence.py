"""Fencing, piece by piece: the ownership rules in SQL (the guarded reclaim, outcome
writes conditional on ownership, a late 250 still recorded). The self-fence decision
(pure, injectable clock) is in tests/unit/test_fence.py; the cluster scenarios with a
real partition in tests/cluster/test_fencing.py."""

from __future__ import annotations

from typing import Any

from sendsystem.db import Database
from tests.harness.env import Env
from tests.harness.helpers import make_newsletter

# ------------------------------------------------------------ the decision


# --------------------------------------------------------- ownership in SQL


def _sql(db: Database, statement: str, params: Any = None) -> list[dict[str, Any]]:
    # Test set-up only: the product's SQL goes through named statements.
    conn = db._ensure()
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return list(cur.fetchall())


def _world(env: Env) -> tuple[int, int, list[int]]:
    """Two send workers, a merged newsletter of 4, all in a batch of worker A."""
    db = env.db
    nid = make_newsletter(env, 4)
    _sql(db, "UPDATE messages SET state = 'merged', body = 'x' WHERE newsletter_id = %s",
         (nid,))
    ids = [int(r["id"]) for r in _sql(db, "SELECT id FROM messages WHERE newsletter_id = %s "
                                          "ORDER BY id", (nid,))]
    workers = []
    for name in ("a", "b"):
        workers.append(db.insert("worker_register", {"host": "h", "role": "send", "name": name,
                                                     "pid": 1, "db_node": None}))
    batch = db.insert("batch_insert", {"role": "send", "worker": workers[0], "newsletter": nid})
    _sql(db, "UPDATE messages SET batch_id = %s WHERE newsletter_id = %s", (batch, nid))
    return workers[0], batch, ids


def test_reclaim_rereads_the_heartbeat(env: Env) -> None:
    db = env.db
    worker, batch, ids = _world(env)
    timeout_us = 3_000_000
    # The balancer saw a stale heartbeat, but the worker heartbeated since.
    db.execute("worker_heartbeat", {"id": worker, "state": "running", "rate": None,
                                    "backlog": 0, "processed": 0, "db_node": None})
    assert db.execute("batch_mark_reclaimed", {"batch": batch, "timeout_us": timeout_us}) == 0
    _sql(db, "UPDATE workers SET heartbeat_at = NOW(6) - INTERVAL 4 SECOND WHERE id = %s",
         (worker,))
    assert db.execute("batch_mark_reclaimed", {"batch": batch, "timeout_us": timeout_us}) > 0
    assert db.execute("batch_release_messages", {"batch": batch}) == len(ids)
    row = _sql(db, "SELECT b.state, w.reclaimed_at FROM batches b JOIN workers w "
                   "ON w.id = b.worker_id WHERE b.id = %s", (batch,))[0]
    assert row["state"] == "reclaimed" and row["reclaimed_at"] is not None


def test_outcomes_for_a_reclaimed_row_only_a_250_is_written(env: Env) -> None:
    db = env.db
    worker, batch, ids = _world(env)
    _sql(db, "UPDATE workers SET heartbeat_at = NOW(6) - INTERVAL 4 SECOND WHERE id = %s",
         (worker,))
    db.execute("batch_mark_reclaimed", {"batch": batch, "timeout_us": 3_000_000})
    db.execute("batch_release_messages", {"batch": batch})
    # A peer gets the rows under a new batch id.
    peer = int(_sql(db, "SELECT id FROM workers WHERE name = 'b'")[0]["id"])
    nid = int(_sql(db, "SELECT newsletter_id FROM messages WHERE id = %s", (ids[0],))[0]
              ["newsletter_id"])
    new_batch = db.insert("batch_insert", {"role": "send", "worker": peer, "newsletter": nid})
    _sql(db, "UPDATE messages SET batch_id = %s WHERE id IN %s", (new_batch, ids))
    me = {"worker": worker}
    # The fenced worker's late answers: 4xx, 5xx and a skip are dropped ...
    assert db.execute_values("send_mark_deferred", [(ids[0], 451, "451 later", 1000)], me) == 0
    assert db.execute_values("send_mark_failed", [(ids[1], 550, "550 no", None)], me) == 0
    assert db.execute_values("send_mark_skipped", [(ids[2], "blocked")], me) == 0
    # ... a 250 is the truth and is recorded, leaving the row in no batch.
    assert db.execute_values("send_mark_sent", [(ids[3], 250, "250 ok", "<m>")], me) == 1
    rows = {int(r["id"]): r for r in _sql(
        db, "SELECT id, state, batch_id, send_worker_id FROM messages WHERE id IN %s", (ids,))}
    assert [rows[i]["state"] for i in ids] == ["merged", "merged", "merged", "sent"]
    assert [rows[i]["batch_id"] for i in ids[:3]] == [new_batch] * 3
    assert rows[ids[3]]["batch_id"] is None and rows[ids[3]]["send_worker_id"] == worker
    # The new owner's own outcomes are written.
    assert db.execute_values("send_mark_failed", [(ids[1], 550, "550 no", None)],
                             {"worker": peer}) == 1


def test_outcomes_for_rows_still_ours_are_written(env: Env) -> None:
    db = env.db
    worker, _batch, ids = _world(env)
    me = {"worker": worker}
    assert db.execute_values("send_mark_deferred", [(ids[0], 451, "451 later", 1000)], me) == 1
    assert db.execute_values("send_mark_failed", [(ids[1], 550, "550 no", None)], me) == 1
    assert db.execute_values("send_mark_skipped", [(ids[2], "blocked")], me) == 1


def test_a_zombie_sort_worker_cannot_write_a_reclaimed_batch(env: Env) -> None:
    """The sort worker needs no self-fence: it has no side effect outside the
    database, and sort_mark writes only rows still in the batch it names, so a
    merge finished after a reclaim is dropped (the new owner merges again)."""
    db = env.db
    nid = make_newsletter(env, 3)
    worker = db.insert("worker_register", {"host": "h", "role": "sort", "name": "s", "pid": 1,
                                           "db_node": None})
    batch = db.insert("batch_insert", {"role": "sort", "worker": worker, "newsletter": nid})
    _sql(db, "UPDATE messages SET batch_id = %s WHERE newsletter_id = %s", (batch, nid))
    ids = [int(r["id"]) for r in _sql(db, "SELECT id FROM messages WHERE newsletter_id = %s",
                                      (nid,))]
    _sql(db, "UPDATE workers SET heartbeat_at = NOW(6) - INTERVAL 4 SECOND WHERE id = %s",
         (worker,))
    assert db.execute("batch_mark_reclaimed", {"batch": batch, "timeout_us": 3_000_000}) > 0
    db.execute("batch_release_messages", {"batch": batch})
    rows = [(i, "merged", b"body", None) for i in ids]
    assert db.execute_values("sort_mark", rows, {"batch": batch, "worker": worker}) == 0
    assert {r["state"] for r in _sql(db, "SELECT state FROM messages WHERE newsletter_id = %s",
                                     (nid,))} == {"queued"}
