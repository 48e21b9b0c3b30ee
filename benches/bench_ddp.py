"""DDP (and FSDP2) on 2 CPU processes against 1 process: training steps/s of examples/train_ddp.py, run through the
torchrun line docs/distributed.md gives (so the bench also keeps that line honest). Same global batch, model and
steps for every run; the first step (warm-up) is left out of the rate. extra_info: steps_per_s, tokens_per_s and
the run's shape; the timed wall clock includes process start-up and imports, so compare extra_info, not the
median. Has no "family" key on purpose: tools/bench_table.py reads the op benches only.

    pytest benches/bench_ddp.py --benchmark-only --benchmark-json=bench-results/ddp.json   # ~1 min on 2 cores
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(hidden=256, layers=4, seq=128, batch=8)
STEPS = 12

RUNS = {  # name: (processes, threads per process, wrapper flag)
    "1proc-1thread": (1, 1, []),
    "1proc-2threads": (1, 2, []),
    "ddp-2proc": (2, 1, []),
    "fsdp2-2proc": (2, 1, ["--fsdp"]),
}


def train(procs, threads, flags):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           os.path.join(ROOT, "examples", "train_ddp.py"), f"--steps={STEPS}", *flags,
           *(f"--{k}={v}" for k, v in MODEL.items())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return float(re.search(r"([\d.]+) steps/s", done.stdout).group(1))


@pytest.mark.parametrize("run", list(RUNS))
def test_ddp_cpu(benchmark, run):
    procs, threads, flags = RUNS[run]
    rate = benchmark.pedantic(train, args=(procs, threads, flags), rounds=1, iterations=1)
    benchmark.extra_info.update(bench="ddp", run=run, processes=procs, threads_per_process=threads,
                                wrapper="fsdp2" if "--fsdp" in flags else ("ddp" if procs > 1 else "none"),
                                steps=STEPS, steps_per_s=rate, tokens_per_s=rate * MODEL["batch"] * MODEL["seq"],
                                **MODEL)
