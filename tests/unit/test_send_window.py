"""The send worker's unconfirmed window (sendsystem.roles.send_worker.Window): a
semaphore whose waiters can be sent away, pure asyncio. Where the slot is taken
(after the relay's 354) is tested against a real SMTP server in
tests/integration/test_delivery.py and test_poison.py."""

from __future__ import annotations

import asyncio

import pytest

from sendsystem.roles.send_worker import Window


def test_slots_are_handed_to_waiters_in_order() -> None:
    async def main() -> list[str]:
        window = Window(2)
        order: list[str] = []
        assert await window.take() and await window.take()
        assert window.free == 0

        async def waiter(name: str) -> None:
            assert await window.take()
            order.append(name)

        tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
        await asyncio.sleep(0)
        window.release()
        window.release()
        await asyncio.sleep(0)
        assert order == ["a", "b"] and window.free == 0  # handed over, never counted free
        window.release()     # `a` is done with it: it goes to `c`
        await asyncio.gather(*tasks)
        for _ in range(2):   # `b` and `c`
            window.release()
        assert window.free == 2
        return order

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_interrupt_sends_every_waiter_away_without_a_slot() -> None:
    async def main() -> None:
        window = Window(1)
        assert await window.take()
        waiters = [asyncio.create_task(window.take()) for _ in range(3)]
        await asyncio.sleep(0)
        window.interrupt()
        assert await asyncio.gather(*waiters) == [False, False, False]
        window.release()
        assert window.free == 1 and await window.take()

    asyncio.run(main())


def test_a_cancelled_waiter_passes_a_slot_it_was_handed_on() -> None:
    async def main() -> None:
        window = Window(1)
        assert await window.take()
        first = asyncio.create_task(window.take())
        second = asyncio.create_task(window.take())
        await asyncio.sleep(0)
        window.release()     # handed to `first` ...
        first.cancel()       # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second  # the slot went on, not lost
        window.release()
        assert window.free == 1

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        window = Window(1)
        assert await window.take()
        waiter = asyncio.create_task(window.take())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        window.release()
        assert window.free == 1

    asyncio.run(main())
