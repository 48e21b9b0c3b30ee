"""Round-robin timing, the way the tools/*_interleaved.py scripts compare implementations: each step once to warm up,
then the steps take turns for `rounds` rounds, so that every one sees the same machine state (pytest-benchmark runs
cases one after another, and on a shared 2-core machine whole cases move by 10% and more). Medians, in seconds."""
import statistics
import time


def interleaved(steps: dict, rounds: int) -> dict:
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
