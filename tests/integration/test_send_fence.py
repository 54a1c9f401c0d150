"""The send worker's point of no return: the window slot is taken and the fence
checked after the relay's 354, right before the body. When the fence shuts (or the
batch goes) while a sender waits there, the transaction is abandoned by closing the
connection in the middle of DATA (an RSET after 354 would be message text), and
nothing reaches the relay. Real MariaDB, a real SMTP server (aiosmtpd), the send
worker in this process; the only thing injected is the moment: a DeliveryPool
subclass shuts the fence when the victim's 354 has arrived."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from sendsystem.delivery import DeliveryPool, Envelope, Ready, Result
from sendsystem.roles.send_worker import SendWorker
from sendsystem.runner import RunOptions
from tests.harness.env import Env
from tests.harness.helpers import make_newsletter, sql, states, stop_all
from tests.harness.smtp_server import SmtpServer
from tests.integration.test_poison import message_rows, sort_all
from tests.integration.test_sending import relay_config

VICTIM = "user3@example.com"


class At354Pool(DeliveryPool):
    """Runs ``hook`` once, after the victim's 354 and before the worker's own check."""

    hook: Callable[[], None] = staticmethod(lambda: None)
    done = False

    async def deliver(self, env: Envelope, ready: Ready | None = None) -> Result:
        if env.recipient != VICTIM or ready is None or self.done:
            return await super().deliver(env, ready)
        inner = ready

        async def shut_then_ready() -> bool:
            self.done = True
            self.hook()
            return await inner()

        return await super().deliver(env, shut_then_ready)


class At354Worker(SendWorker):
    reclaim: Env | None = None  # also reclaim the victim's batch in this database

    def make_pool(self) -> DeliveryPool:
        s = self.config.sending
        pool = At354Pool(s.relays, connections=s.connections,
                         messages_per_connection=s.messages_per_connection, timeout=s.timeout)
        pool.hook = self._shut
        return pool

    def work(self) -> int:
        done = super().work()
        if self.reclaim is not None and self.withdrawn:
            # The victim's rows stay in the reclaimed batch (no balancer hands them
            # out again), so --once would never find the work drained.
            self.request_stop("test: the reclaimed batch was dropped")
        return done

    def _shut(self) -> None:
        # The last heartbeat now looks an hour old: the fence is shut until a new one
        # completes and ownership is verified again (sendsystem/fencing.py).
        self.fence._since = (self.fence._since or 0.0) - 3600.0
        if self.reclaim is not None:
            # As the balancer does once the heartbeat is old; the rows keep their batch
            # id here, so the running balancer does not hand them out again.
            victim = next(mid for mid, row in self.unflushed.items() if row["email"] == VICTIM)
            sql(self.reclaim, "UPDATE batches SET state = 'reclaimed', finished_at = NOW(6) "
                              "WHERE id = %s", (self.batch_of[victim],))


def run_worker(env: Env, worker: SendWorker) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert worker.run() == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def test_fence_shut_after_354_withdraws_and_the_message_goes_once_later(env: Env) -> None:
    n = 20
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, n)
        sort_all(env)
        balancer = env.spawn("send-balancer", "--name", "tb")
        try:
            worker = At354Worker(env.config, RunOptions(name="tw", once=True))
            deadline = time.monotonic() + 60
            while states(env, nid).get("sent", 0) < n:
                assert time.monotonic() < deadline, states(env, nid)
                run_worker(env, worker)
                worker = At354Worker(env.config, RunOptions(name="tw", once=True))
                worker.make_pool = lambda: DeliveryPool(  # type: ignore[method-assign]
                    env.config.sending.relays, connections=4, messages_per_connection=100,
                    timeout=10.0)
        finally:
            stop_all(balancer)
        counts = srv.count_by_recipient()
    # The withdrawn attempt sent nothing (else the victim would be there twice); it
    # went once, after the fence opened again.
    assert counts == {f"user{i}@example.com": 1 for i in range(n)}
    row = message_rows(env, nid)[VICTIM]
    assert row["state"] == "sent" and row["attempts"] == 1


def test_batch_reclaimed_while_at_354_is_never_sent_by_this_worker(env: Env) -> None:
    n = 20
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, n)
        sort_all(env)
        balancer = env.spawn("send-balancer", "--name", "tb")
        try:
            worker = At354Worker(env.config, RunOptions(name="tw", once=True))
            worker.reclaim = env
            deadline = time.monotonic() + 60
            while not worker.withdrawn:
                assert time.monotonic() < deadline, states(env, nid)
                run_worker(env, worker)
        finally:
            stop_all(balancer)
        counts = srv.count_by_recipient()
    # Every sender waiting after a 354 for that batch withdrew; what it still held
    # of the batch was dropped, not sent.
    assert worker.withdrawn >= 1 and worker.discarded >= 1
    assert VICTIM not in counts
    row = message_rows(env, nid)[VICTIM]
    assert row["state"] == "merged" and row["attempts"] == 0
