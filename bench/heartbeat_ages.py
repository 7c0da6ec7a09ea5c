"""The liveness run's heartbeat-age histogram: one ``observe`` per online device against
``observe_many`` (counted per bucket first), per run, at a country's scale.

    .venv/bin/python -m bench.heartbeat_ages [--devices 250000] [--runs 5]

Every liveness run (every 2 s) observes each online device's age; this times that step
alone, on the event loop's thread, with the fleet's own metric (no broker, no fleet).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from prometheus_client import CollectorRegistry

from fleet.metrics import FleetMetrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=250_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(1)
    ages = [rng.uniform(0, 40) for _ in range(args.devices)]
    metric = FleetMetrics(CollectorRegistry()).heartbeat_age
    one, many = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        for age in ages:
            metric.observe(age)
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        metric.observe_many(ages)
        many.append(time.perf_counter() - t)
    print(f"heartbeat_ages: {args.devices:,} online devices, median of {args.runs} runs")
    print(f"  observe, one by one   {statistics.median(one) * 1e3:7.1f} ms a liveness run")
    print(f"  observe_many          {statistics.median(many) * 1e3:7.1f} ms a liveness run")


if __name__ == "__main__":
    main()
