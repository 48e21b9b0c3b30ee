"""Round-robin timing, the way the tools/*_interleaved.py scripts compare implementations: each step once to warm up,
then the steps take turns for `rounds` rounds, so that every one sees the same machine state (pytest-benchmark runs
cases one after another, and on a shared 2-core machine whole cases move by 10% and more). The order rotates by one
each round: a step that runs right after another pays for what that one left behind (memory it freed back to the
system is page-faulted in again), which a fixed order charges to the same step every round. Medians, in seconds."""
import statistics
import time


def interleaved(steps: dict, rounds: int) -> dict:
    for step in steps.values():
        step()
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
