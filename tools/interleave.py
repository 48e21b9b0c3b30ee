"""Round-robin timing, the way the tools/*_interleaved.py scripts compare implementations: each step once to warm up,
then the steps take turns for `rounds` rounds, so that every one sees the same machine state (pytest-benchmark runs
cases one after another, and on a shared 2-core machine whole cases move by 10% and more). The order rotates by one
each round: a step that runs right after another pays for what that one left behind (memory it freed back to the
system is page-faulted in again), which a fixed order charges to the same step every round. Medians, in seconds."""
import resource
import statistics
import subprocess
import sys
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


def peak_rss_mib(script: str, argv: list, only: str) -> float:
    """Peak memory of one implementation: the max RSS of a fresh process running `script *argv --only ONLY`, which
    builds only that one, runs a few steps and prints max_rss_mib(). Call it while the caller is small: Linux carries
    a process's max RSS over into the program it execs."""
    out = subprocess.run([sys.executable, script, *argv, "--only", only], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
