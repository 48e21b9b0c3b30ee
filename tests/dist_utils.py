"""Spawning gloo process groups from a test: free ports, hard deadlines (nothing may hang CI), one thread per rank
(the CI machine has 2 cores), and errors of a rank re-raised in the test with the rank's traceback."""
import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Collectives give up after this (gloo honours it), and the parent kills ranks that outlive DEADLINE.
COLLECTIVE_TIMEOUT_S = 60
DEADLINE_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int):
    """Join the gloo group on localhost; called first thing in a spawned rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _entry(rank, fn, world, port, errors, args):
    init(rank, world, port)
    try:
        fn(rank, world, *args)
    except BaseException:
        # Kept per rank: the first rank to fail is often a victim (a collective its failed peer left).
        with open(os.path.join(errors, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run(fn, *args, world: int = 2, deadline_s: float = DEADLINE_S):
    """Run `fn(rank, world, *args)` in `world` spawned processes inside a gloo group. `fn` must be importable (a
    module-level function). Raises RuntimeError with every failed rank's traceback, or TimeoutError after killing
    every rank still alive."""
    errors = tempfile.mkdtemp(prefix="dist_errors_")
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), errors, args), nprocs=world, join=False,
                             start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.0, end - time.monotonic())):
            if time.monotonic() >= end:
                raise TimeoutError(f"{fn.__name__} ran past {deadline_s}s on {world} ranks")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        for p in ctx.processes:  # let the other ranks finish writing their errors (or time out)
            p.join(max(0.0, min(10.0, end - time.monotonic())))
        reports = [open(os.path.join(errors, f)).read() for f in sorted(os.listdir(errors))]
        raise RuntimeError(f"{fn.__name__} failed on {len(reports) or 'some'} of {world} ranks:\n"
                           + "\n".join(reports)) from e
    finally:
        for p in ctx.processes:  # only ours, by handle; a no-op on ranks that exited
            if p.is_alive():
                p.kill()
                p.join(5)
