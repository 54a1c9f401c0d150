"""The cluster tier's fixtures: a private mariadbd per module (a test may stop and
start it) and a fresh Cluster (database, config, role processes) per test. The
Galera module brings its own three-node server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster, MariaDB


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    server = MariaDB(tmp_path_factory.mktemp("mariadb"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cluster(mariadb: MariaDB, tmp_path: Path) -> Iterator[Cluster]:
    if not mariadb.running:  # a previous test failed while the server was down
        mariadb.start()
    c = Cluster(mariadb, tmp_path)
    yield c
    c.close()
