"""The balancing policy: table-driven cases, hypothesis properties, simulations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendsystem.balancing import BalanceParams, balance, capacity
from sendsystem.balancing import WorkerLoad as WorkerState
from sendsystem.config import BalancerConfig
from sendsystem.errors import ConfigError
from sendsystem.ratemeter import RateMeter

P = BalanceParams(horizon_seconds=10.0, batch_min=50, batch_max=2000, probe_batch=20)


def W(wid: int, rate: float | None, backlog: int = 0, available: bool = True) -> WorkerState:
    return WorkerState(worker_id=wid, rate=rate, backlog=backlog, available=available)


# --------------------------------------------------------------------------- table


@pytest.mark.parametrize(
    ("workers", "ready", "expected"),
    [
        pytest.param([], 1000, {}, id="no workers"),
        pytest.param([W(1, 100)], 0, {}, id="nothing ready"),
        pytest.param([W(1, 100, available=False)], 1000, {}, id="unavailable gets nothing"),
        pytest.param([W(1, 100)], 5000, {1: 1000}, id="filled to rate*horizon"),
        pytest.param([W(1, 100, 1000)], 5000, {}, id="backlog covers horizon: nothing"),
        pytest.param([W(1, 100, 2000)], 5000, {}, id="behind: never further behind"),
        pytest.param([W(1, 100, 600)], 5000, {1: 400}, id="tops up to horizon"),
        pytest.param([W(1, 100, 980)], 5000, {}, id="room below batch_min left alone"),
        pytest.param([W(1, 100, 980)], 30, {1: 20}, id="tail fills small room"),
        pytest.param([W(1, 100)], 30, {1: 30}, id="tail below batch_min assigned"),
        pytest.param([W(1, None)], 1000, {1: 20}, id="new worker probe"),
        pytest.param([W(1, None)], 7, {1: 7}, id="probe limited by ready"),
        pytest.param([W(1, 0.0)], 1000, {1: 20}, id="rate 0 counts as unknown"),
        pytest.param([W(1, None, 5)], 1000, {}, id="no second probe while one runs"),
        pytest.param([W(1, 100), W(2, None)], 5000, {1: 1000, 2: 20}, id="probe next to measured"),
        pytest.param(
            [W(1, 100), W(2, 150)], 5000, {1: 1000, 2: 1500}, id="plenty: each to its horizon"
        ),
        pytest.param(
            [W(1, 100, 900), W(2, 150, 1200)],
            5000,
            {1: 100, 2: 300},
            id="plenty: topped up to the horizon",
        ),
        pytest.param(
            [W(1, 100), W(2, 400)],
            5000,
            {1: 500, 2: 2000},
            id="ramping worker (batch_max) sets the level for the others",
        ),
        pytest.param(
            [W(1, 100), W(2, 4000)],
            50_000,
            {1: 250, 2: 2000},
            id="level never below a quarter of the horizon",
        ),
        pytest.param(
            [W(1, 100, 900), W(2, 400)],
            5000,
            {2: 2000},
            id="others wait while a new fast worker catches up",
        ),
        pytest.param([W(1, 100), W(2, 400)], 1000, {1: 200, 2: 800}, id="scarce: split by rate"),
        pytest.param([W(1, 100), W(2, 200), W(3, 400)], 700, {1: 100, 2: 200, 3: 400}, id="1:2:4"),
        pytest.param(
            [W(1, 100), W(2, 100), W(3, 100)],
            1000,
            {1: 334, 2: 333, 3: 333},
            id="largest remainder, ties to lower id",
        ),
        pytest.param(
            [W(1, 100, 500), W(2, 100, 0)], 200, {2: 200}, id="behind one gets less (finish time)"
        ),
        pytest.param(
            [W(1, 100, 100), W(2, 100, 0)],
            300,
            {1: 100, 2: 200},
            id="equal finish times at the end of a run",
        ),
        pytest.param(
            [W(1, 1000), W(2, 1000), W(3, 1000)],
            120,
            {1: 60, 2: 60},
            id="no batches below batch_min: consolidated",
        ),
        pytest.param(
            [W(1, 1000), W(2, 1000), W(3, 1000), W(4, 1000)],
            40,
            {1: 40},
            id="small tail in one batch",
        ),
        pytest.param(
            [W(1, 1000, 30), W(2, 1000, 0)], 40, {2: 40}, id="tail to the first to be idle"
        ),
        pytest.param([W(1, 10_000)], 50_000, {1: 2000}, id="batch_max per tick"),
        pytest.param([W(1, 0.01)], 100, {1: 1}, id="very slow worker still gets 1"),
        pytest.param([W(1, 0.01, 1)], 100, {}, id="very slow worker holds at most 1"),
        pytest.param([W(1, 2)], 100, {1: 20}, id="capacity below batch_min: whole capacity"),
        pytest.param([W(1, 2, 5)], 100, {}, id="capacity below batch_min: no dribble"),
    ],
)
def test_table(workers: list[WorkerState], ready: int, expected: dict[int, int]) -> None:
    assert balance(workers, ready, P) == expected
    # The order of the input does not matter.
    assert balance(list(reversed(workers)), ready, P) == expected


def test_tail_split_when_one_worker_cannot_take_it_all() -> None:
    # rates 1/s, horizon 10 -> capacity 10 each; 15 left (a tail): must all go out.
    out = balance([W(1, 1.0), W(2, 1.0)], 15, P)
    assert sum(out.values()) == 15
    assert all(v <= 10 for v in out.values())


def test_params_validated() -> None:
    with pytest.raises(ConfigError, match="batch_min"):
        BalanceParams(horizon_seconds=10, batch_min=500, batch_max=100, probe_batch=10)
    with pytest.raises(ConfigError, match="horizon"):
        BalanceParams(horizon_seconds=0, batch_min=1, batch_max=100, probe_batch=10)


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(ValueError):
        balance([W(1, 10), W(1, 20)], 10, P)


# --------------------------------------------------------------------- properties

rates = st.one_of(
    st.none(),
    st.just(0.0),
    st.floats(min_value=0.005, max_value=5000, allow_nan=False),
)
workers_st = st.lists(
    st.builds(
        lambda r, b, a: (r, b, a),
        rates,
        st.integers(min_value=0, max_value=50_000),
        st.sampled_from([True, True, True, False]),
    ),
    max_size=8,
).map(lambda xs: [W(i + 1, r, b, a) for i, (r, b, a) in enumerate(xs)])
params_st = st.builds(
    lambda h, bmin, extra, probe: BalanceParams(h, bmin, bmin + extra, probe),
    st.floats(min_value=0.5, max_value=120),
    st.integers(min_value=0, max_value=200),
    st.integers(min_value=1, max_value=3000),
    st.integers(min_value=1, max_value=100),
)


def _known(w: WorkerState) -> bool:
    return w.rate is not None and w.rate > 0


@settings(max_examples=400, deadline=None)
@given(workers=workers_st, ready=st.integers(min_value=0, max_value=100_000), params=params_st)
def test_properties(workers: list[WorkerState], ready: int, params: BalanceParams) -> None:
    out = balance(workers, ready, params)
    by_id = {w.worker_id: w for w in workers}

    assert all(v > 0 for v in out.values())
    assert sum(out.values()) <= ready
    probes = {k: v for k, v in out.items() if not _known(by_id[k])}
    rest = ready - sum(probes.values())
    tail = rest < params.batch_min
    for wid, n in out.items():
        w = by_id[wid]
        assert w.available, "unavailable worker got work"
        assert n <= params.batch_max
        if not _known(w):
            assert w.backlog == 0 and n == min(params.probe_batch, params.batch_max, ready), (
                "probe is one small batch, only with an empty backlog"
            )
            continue
        assert w.rate is not None
        cap = capacity(w.rate, params)
        assert w.backlog + n <= max(1.0, w.rate * params.horizon_seconds + 1e-6)
        if not tail:
            assert n >= min(params.batch_min, cap), "dribbled a tiny batch"

    # Total never exceeds what the measured workers can finish in the horizon.
    can_finish = sum(
        max(0, capacity(w.rate, params) - w.backlog)
        for w in workers
        if w.available and w.rate is not None and w.rate > 0
    )
    assert sum(out.values()) - sum(probes.values()) <= can_finish

    # The tail is always assigned as far as there is room for it.
    if tail:
        room = sum(
            min(params.batch_max, max(0, capacity(w.rate, params) - w.backlog))
            for w in workers
            if w.available and w.rate is not None and w.rate > 0
        )
        assert sum(out.values()) - sum(probes.values()) == min(rest, room)


@settings(max_examples=300, deadline=None)
@given(
    speeds=st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=6),
    fraction=st.floats(min_value=0.05, max_value=0.99),
)
def test_scarce_work_split_in_proportion_to_rate(speeds: list[int], fraction: float) -> None:
    """Empty backlogs, ready < total room: largest-remainder split by rate."""
    params = BalanceParams(horizon_seconds=10, batch_min=1, batch_max=100_000, probe_batch=10)
    workers = [W(i + 1, float(s)) for i, s in enumerate(speeds)]
    total_room = sum(s * 10 for s in speeds)
    ready = max(1, int(total_room * fraction))
    out = balance(workers, ready, params)
    assert sum(out.values()) == ready  # not first-come: everything split
    total_rate = sum(speeds)
    for w in workers:
        assert w.rate is not None
        exact = ready * w.rate / total_rate
        assert math.floor(exact) <= out.get(w.worker_id, 0) <= math.ceil(exact)


@settings(max_examples=300, deadline=None)
@given(
    workers=st.lists(
        st.tuples(st.floats(min_value=1, max_value=1000), st.integers(min_value=0, max_value=5000)),
        min_size=1,
        max_size=6,
    ),
    ready=st.integers(min_value=1, max_value=20_000),
)
def test_finish_times_equalised(workers: list[tuple[float, int]], ready: int) -> None:
    """Whoever receives work does not end up finishing later than anyone else needs to."""
    params = BalanceParams(horizon_seconds=30, batch_min=1, batch_max=100_000, probe_batch=10)
    ws = [W(i + 1, r, b) for i, (r, b) in enumerate(workers)]
    out = balance(ws, ready, params)
    finish = {w.worker_id: (w.backlog + out.get(w.worker_id, 0)) / (w.rate or 1) for w in ws}
    receivers = [w for w in ws if out.get(w.worker_id)]
    for r in receivers:
        assert r.rate is not None
        # Up to rounding (one message either way), no receiver finishes
        # later than a worker that still had room.
        before = (r.backlog + out[r.worker_id] - 1) / r.rate
        for w in ws:
            assert w.rate is not None
            if w.backlog + out.get(w.worker_id, 0) < capacity(w.rate, params):
                assert before <= finish[w.worker_id] + 1 / w.rate + 1e-6


# --------------------------------------------------------------------- simulation


@dataclass
class SimWorker:
    worker_id: int
    speed: float  # true messages/s
    meter: RateMeter = field(default_factory=RateMeter)
    backlog: int = 0
    done: int = 0
    credit: float = 0.0

    def work(self, dt: float) -> None:
        self.credit += self.speed * dt
        n = min(self.backlog, math.floor(self.credit))
        self.credit = self.credit - n if self.backlog > n else 0.0  # idle: no banked credit
        self.backlog -= n
        self.done += n
        if n:
            self.meter.busy(n, n / self.speed)


def simulate(
    speeds: list[float], total: int, params: BalanceParams, tick: float = 0.5
) -> tuple[list[int], float]:
    """Run the balancer every tick over workers of the given true speeds.

    Returns each worker's processed count and the finish time in seconds.
    """
    workers = [SimWorker(i + 1, s) for i, s in enumerate(speeds)]
    pool = total
    t = 0.0
    for _ in range(100_000):
        if pool == 0 and all(w.backlog == 0 for w in workers):
            break
        states = [WorkerState(w.worker_id, w.meter.rate(), w.backlog) for w in workers]
        given_now = balance(states, pool, params)
        for w in workers:
            n = given_now.get(w.worker_id, 0)
            w.backlog += n
            pool -= n
        assert pool >= 0
        for w in workers:
            w.work(tick)
        t += tick
    else:
        raise AssertionError("simulation did not finish")
    assert sum(w.done for w in workers) == total
    return [w.done for w in workers], t


SIM = BalanceParams(horizon_seconds=5.0, batch_min=10, batch_max=500, probe_batch=10)


@pytest.mark.parametrize("total", [3500, 7000, 20_000])
def test_simulation_1_2_4(total: int) -> None:
    speeds = [10.0, 20.0, 40.0]
    done, finish = simulate(speeds, total, SIM)
    for d, s in zip(done, speeds, strict=True):
        expected = total * s / sum(speeds)
        assert abs(d - expected) <= 0.10 * expected, (done, speeds)
    ideal = total / sum(speeds)
    assert finish <= 1.2 * ideal + 5 * 0.5, (finish, ideal)


def test_simulation_40_vs_160() -> None:
    done, finish = simulate([40.0, 160.0], 4000, SIM)
    assert 0.70 <= done[1] / 4000 <= 0.90, done
    assert finish <= 1.2 * 20 + 5 * 0.5, finish


def test_simulation_mixed_speeds_with_ramp_up() -> None:
    """A 1000/s worker needs ~30 ticks of batch_max to fill its horizon; the
    others are held at its level meanwhile, so a short run still ends together."""
    params = BalanceParams(horizon_seconds=30.0, batch_min=50, batch_max=2000, probe_batch=50)
    speeds = [40.0, 160.0, 1000.0, 5.0]
    done, finish = simulate(speeds, 50_000, params, tick=1.0)
    for d, s in zip(done, speeds, strict=True):
        expected = 50_000 * s / sum(speeds)
        assert abs(d - expected) <= 0.10 * expected + params.batch_min, (done, speeds)
    assert finish <= 1.1 * 50_000 / sum(speeds) + 5, finish


def test_simulation_with_config_defaults() -> None:
    """The shipped [balancer] defaults (sendsystem/config.py), at their tick."""
    b = BalancerConfig()
    params = BalanceParams(horizon_seconds=b.horizon_seconds, batch_min=b.batch_min,
                           batch_max=b.batch_max, probe_batch=b.probe_batch)
    done, finish = simulate([40.0, 160.0], 20_000, params, tick=b.tick_seconds)
    assert 0.75 <= done[1] / 20_000 <= 0.85, done
    assert finish <= 1.2 * 100 + 5, finish
