"""A small dependency-ordered job runner: ``workers`` jobs at a time, each in its own process.

On a 2-core machine two single-threaded jobs keep both cores busy where one job on two
threads does not (small matrices, and OpenMP threads that wait on each other whenever another
process takes a core). Every job's output goes to ``logs/<job>.log``; the terminal shows one
line per job and an overall bar. Jobs are idempotent (each skips work already on disk), so a
rerun after an interruption continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dcr_fast.cli import is_user_error


@dataclasses.dataclass(frozen=True)
class Job:
    """``fn(*args)`` once every job named in ``deps`` has finished; ``fn`` must be picklable."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    deps: tuple[str, ...] = ()


class JobFailed(RuntimeError):
    """A job failed with a bug (not bad input); the message names it and points at its log, which
    holds the traceback. Bad input found by a job is re-raised as the same user error, naming the job."""


def run_jobs(jobs: Sequence[Job], *, workers: int, threads: int, log_dir: Path, progress: bool = True) -> dict[str, float]:
    """Run ``jobs`` in dependency order, earlier jobs first among the ready ones; returns wall seconds per job."""
    _check_graph(jobs)
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    done: dict[str, float] = {}
    bar = tqdm(total=len(jobs), desc="reproduce", unit="job", disable=not progress, dynamic_ncols=True)
    if workers == 1:
        for job in pending:
            done[job.name] = _run_logged(job, threads, log_dir, in_process=True)
            _report(bar, job.name, done[job.name])
        bar.close()
        return done
    context = multiprocessing.get_context("spawn")  # a forked child inherits torch's thread pools broken
    running: dict[Future, Job] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while pending or running:
            for job in [j for j in pending if all(d in done for d in j.deps)][: workers - len(running)]:
                pending.remove(job)
                running[pool.submit(_run_logged, job, threads, log_dir, False, os.getpid())] = job
                bar.set_postfix_str(", ".join(j.name for j in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    done[job.name] = future.result()
                except BaseException:
                    for other in running:
                        other.cancel()
                    raise
                _report(bar, job.name, done[job.name])
    bar.close()
    return done


def _run_logged(job: Job, threads: int, log_dir: Path, in_process: bool = False, parent: int | None = None) -> float:
    """Run one job with its output (Python and C level) appended to its log; raises JobFailed."""
    import torch

    if parent is not None:
        _exit_with(parent)

    log = log_dir / f"{job.name.replace('/', '_')}.log"
    started = time.perf_counter()
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sys.stdout.flush()
    sys.stderr.flush()
    fds = [os.dup(1), os.dup(2)]
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"== {job.name} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                job.fn(*job.args)
        except BaseException as error:
            traceback.print_exc(file=handle)
            handle.flush()
            if isinstance(error, KeyboardInterrupt):
                raise
            if is_user_error(error):  # bad input found inside a job stays a user error, named by its job
                raise type(error)(f"{error} (in job {job.name}; its log: {log})") from None
            raise JobFailed(f"job {job.name!r} failed ({type(error).__name__}: {error}); its log: {log}") from None
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            for fd in fds:
                os.close(fd)
            if in_process:
                torch.set_num_threads(saved)
    return time.perf_counter() - started


_WATCHING: list[int] = []


def _exit_with(parent: int) -> None:
    """End this worker process when ``parent`` is gone (killed, not just interrupted): a job left
    running without its runner would hold a core and write into the run folder unseen."""
    if _WATCHING:
        return
    _WATCHING.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _report(bar, name: str, seconds: float) -> None:
    bar.update(1)
    bar.write(f"  done {name} ({seconds / 60:.1f} min)")


def _check_graph(jobs: Sequence[Job]) -> None:
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"jobs: duplicate names in {names}")
    seen: set[str] = set()
    for job in jobs:
        missing = [d for d in job.deps if d not in seen]
        if missing:
            raise ValueError(f"jobs: {job.name!r} depends on {missing}, which are not listed before it")
        seen.add(job.name)
