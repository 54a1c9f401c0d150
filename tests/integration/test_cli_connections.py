"""CLI commands close their database connection (no "Aborted connection" per cron run).

MariaDB counts a client that goes away without COM_QUIT in the global status
counter Aborted_clients (and logs "Aborted connection" for it). The counter
is server-wide and other tests on the machine may bump it, so a clean run is
one measuring window in which it did not grow at all; without the close every
window grows by at least the number of commands run.
"""

from __future__ import annotations

import pymysql

from tests.harness.env import Env, server_settings

RUNS = 3


def _aborted_clients() -> int:
    conn = pymysql.connect(**server_settings())  # type: ignore[arg-type]
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Aborted_clients'")
            row = cur.fetchone()
            assert row is not None
            return int(row[1])
    finally:
        conn.close()


def test_status_closes_its_connection(env: Env) -> None:
    growth = []
    for _ in range(3):  # three windows: one clean one is proof
        before = _aborted_clients()
        for _ in range(RUNS):
            code, _out, err = env.cli("status")
            assert code == 0, err
        growth.append(_aborted_clients() - before)
        if growth[-1] == 0:
            break
    assert growth[-1] == 0, f"Aborted_clients grew by {growth} over {RUNS} `status` runs"



def test_check_and_metrics_close_their_connection(env: Env) -> None:
    growth = []
    for _ in range(3):
        before = _aborted_clients()
        for args in (("check",), ("metrics",)):
            code, _out, err = env.cli(*args)
            assert code in (0, 1, 2), err
        growth.append(_aborted_clients() - before)
        if growth[-1] == 0:
            break
    assert growth[-1] == 0, f"Aborted_clients grew by {growth} over `check` + `metrics`"
