"""Scale-out: workers of different speeds (--max-rate caps) share one newsletter.

    .venv/bin/python bench/scaleout.py                              # sort 50/100/200/400
    .venv/bin/python bench/scaleout.py --role send --rates 100,200,300
    .venv/bin/python bench/scaleout.py --rates 40,160 -n 6000

Each capped worker stands for a server of that speed (messages/s). The other
stage runs two uncapped workers so it never limits the capped one. Prints each
capped worker's share of the messages against its share of the total speed,
its measured rate, and the capped stage's finish time against the ideal
(total / sum of speeds). The load-aware promise (ARCHITECTURE.md): shares proportional to speed,
finish close to the ideal.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common import bench_database, raw_connect, server_line
from pipeline import (
    enqueue,
    follow,
    open_sink,
    prepare,
    restart_lines,
    stage_times,
    tuning_args,
    tuning_from,
)

from sendsystem import stats
from sendsystem.config import load_config
from sendsystem.db import Database
from sendsystem.demo import Cluster, RoleSpec, wait_registered


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("sort", "send"), default="sort",
                    help="which stage gets the capped workers")
    ap.add_argument("--rates", default="50,100,200,400",
                    help="comma-separated --max-rate caps, one worker each")
    ap.add_argument("-n", "--recipients", type=int, default=0,
                    help="default: 30 s of work at the summed speed")
    ap.add_argument("--sink", choices=("smtp-sink", "counting"),
                    default="smtp-sink")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--keep", action="store_true")
    tuning_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    total_speed = sum(rates)
    n = args.recipients or int(total_speed * 30)
    tuning = tuning_from(args)
    other = "send" if args.role == "sort" else "sort"
    capped = [RoleSpec(f"{args.role}-worker", f"{args.role}-{i + 1}-at-{rate:g}", rate)
              for i, rate in enumerate(rates)]
    roles = [RoleSpec("sort-balancer", "b1"), RoleSpec("send-balancer", "b1"), *capped,
             RoleSpec(f"{other}-worker", f"{other}-a"), RoleSpec(f"{other}-worker", f"{other}-b")]
    work = Path(tempfile.mkdtemp(prefix="sendsystem-scaleout-"))
    with bench_database(keep=args.keep) as (config, db), open_sink(args.sink) as (relay, _):
        conn = raw_connect()
        print(server_line(conn))
        conn.close()
        config_path = prepare(config, db, work, relay, tuning, n)
        cluster = Cluster(config_path, roles, work / "logs", log_level="WARNING")
        cluster.start()
        try:
            wait_registered(Database(load_config(config_path, env={}).database), cluster)
            nid, created = enqueue(db, work)
            follow(db, cluster, nid, created, ("sent", "failed", "skipped", "bounced"),
                   args.timeout)
        finally:
            cluster.stop()
        t = stage_times(config.database.name, nid)
        facts = stats.newsletter_stats(db, nid)
    finish = t["release_to_last_merged"] if args.role == "sort" else t["end_to_end"]
    ideal = n / total_speed
    print(f"\n{n:,} messages, {args.role} workers capped at {args.rates} msgs/s "
          f"(sum {total_speed:g}/s), {tuning}")
    print(f"{'worker':<22}{'cap':>7}{'speed share':>13}{'messages':>10}{'share':>8}"
          f"{'measured':>11}{'share/speed':>13}")
    by_name = {w["name"]: w for w in facts["workers"] if w["role"] == args.role}
    for spec in capped:
        w = by_name.get(spec.name, {"messages": 0, "rate": None})
        share = w["messages"] / n
        speed_share = (spec.max_rate or 0) / total_speed
        rate = f"{w['rate']:.0f}/s" if w["rate"] else "-"
        print(f"{spec.name:<22}{spec.max_rate:>7g}{speed_share:>13.1%}{w['messages']:>10,}"
              f"{share:>8.1%}{rate:>11}{share / speed_share:>13.2f}")
    stage = "release -> last merged" if args.role == "sort" else "release -> last sent"
    print(f"finish ({stage}): {finish:.1f} s; ideal (total / sum of speeds) {ideal:.1f} s; "
          f"ratio {finish / ideal:.2f}")
    for line in restart_lines(cluster):
        print(line)
    if args.keep:
        print(f"kept work directory {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
