#!/usr/bin/env python3
"""Pools compare.sh runs: per-round ratios of the proxy under test to nginx.

    bench/paired.py /tmp/lbbench/results-<timestamp> [more result directories...]

compare.sh measures every target once per round, so dividing the proxy's value by nginx's
in the same round cancels the drift between rounds. For each metric this prints the
median of those ratios over all rounds given, a 95% bootstrap interval for that median,
the middle half of the ratios, and in how many rounds the proxy was on the better side.
Run it on an A/A comparison (nginx as the proxy under test, see the README) to see how far
these numbers move when the two sides are the same program.
"""

import math
import random
import statistics
import sys

# runs.tsv columns: round name rps p50us p99us errors cpu0% cpu1% us/req0 newconn other%
METRICS = (("req/s", 2, True), ("p50", 3, False), ("p99", 4, False), ("us/req0", 8, False))


def rounds(directory):
    by_round = {}
    with open(f"{directory}/runs.tsv") as runs:
        for line in runs:
            fields = line.rstrip("\n").split("\t")
            by_round.setdefault(fields[0], {})[fields[1]] = fields
    return [r for r in by_round.values() if "nginx" in r and "proxy" in r]


def median_interval(ratios, rng, resamples=4000):
    logs = [math.log(x) for x in ratios]
    medians = sorted(
        statistics.median(rng.choices(logs, k=len(logs))) for _ in range(resamples)
    )
    return math.exp(medians[resamples // 40]), math.exp(medians[resamples - resamples // 40 - 1])


def main(directories):
    if not directories:
        sys.exit(__doc__)
    pooled = [r for d in directories for r in rounds(d)]
    if len(pooled) < 2:
        sys.exit("need at least two rounds with both nginx and proxy")
    rng = random.Random(1)
    print(f"{len(pooled)} rounds; ratio = proxy / nginx in the same round")
    for name, column, higher_is_better in METRICS:
        ratios = [float(r["proxy"][column]) / float(r["nginx"][column]) for r in pooled]
        low, high = median_interval(ratios, rng)
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        better = sum((x > 1) if higher_is_better else (x < 1) for x in ratios)
        print(
            f"{name:8} median {statistics.median(ratios):.3f}  95% [{low:.3f}, {high:.3f}]"
            f"  middle half {q1:.2f}-{q3:.2f}  proxy better in {better} of {len(ratios)}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
