"""Events per second: the simulator's heap engine against simpy on the same workload,
1,024 workers each looping a random delay then one event, 10^6 events in all. Needs simpy
(``pip install simpy``), which apam_gossip does not depend on:

    .venv/bin/python benchmarks/engine_vs_simpy.py
"""

from __future__ import annotations

import random
import time

import simpy

from apam_gossip.sim.engine import Engine

WORKERS, EVENTS = 1024, 1_000_000


def heap_engine() -> float:
    eng, rng, count = Engine(), random.Random(0), [0]

    def step() -> None:
        count[0] += 1
        if count[0] < EVENTS:
            eng.after(rng.random(), step)

    for _ in range(WORKERS):
        eng.at(0.0, step)
    t = time.perf_counter()
    eng.run()
    return time.perf_counter() - t


def with_simpy() -> float:
    env, rng, count = simpy.Environment(), random.Random(0), [0]

    def worker():
        while count[0] < EVENTS:
            yield env.timeout(rng.random())
            count[0] += 1

    for _ in range(WORKERS):
        env.process(worker())
    t = time.perf_counter()
    env.run()
    return time.perf_counter() - t


if __name__ == "__main__":
    a, b = heap_engine(), with_simpy()
    print(f"{EVENTS:,} events, {WORKERS} workers: heap engine {a:.2f} s ({EVENTS / a:,.0f}/s), "
          f"simpy {b:.2f} s ({EVENTS / b:,.0f}/s); simpy / heap = {b / a:.2f}x")
