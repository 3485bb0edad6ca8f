"""A child process with its log: start it, wait until it is ready, stop it
(SIGTERM, then SIGKILL), and read the tail of what it printed.

Used for every process we start: the children of `--role all` and of
`--role web --grpc-port` (cli.py), the private redis-server, the parts of a
local cluster (run_cluster.py), the servers the benchmark drives, and the
servers the tests run. Output goes to a file, or to our own stdout and
stderr, never a pipe: a pipe nobody reads fills up and blocks the child.
`stop_on_signals` is how each of our own processes hears SIGTERM and SIGINT.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

POLL_S = 0.1
# How long a child that ignored SIGTERM gets to write its stacks (SIGUSR1).
DUMP_WAIT_S = 1.0


class ChildFailed(RuntimeError):
    """A child exited or was not ready in time; the message ends with its log."""


def die_with_parent() -> None:
    """In the child: get SIGTERM if the parent dies, even by kill -9 (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_on_signals(stopping: str) -> threading.Event:
    """An event set once SIGTERM or SIGINT comes, the first logged ("SIGTERM:
    `stopping`"). SIGUSR1 writes the stack of every thread to stderr, the
    process's log: where a process that does not stop is stuck (`Child.stop`
    sends it before it kills one).

    The handler only writes the signal's number to a pipe; a thread of its
    own reads it, logs it and sets the event. Python runs a handler in the
    main thread between two bytecodes of whatever that thread was doing, the
    handler itself included, so a handler that set the event took the
    event's lock wherever the main thread stood: a second SIGTERM that came
    while the first handler held it (the launcher forwards SIGTERM to a child
    that its process group's SIGTERM had reached already) waited for that
    lock forever, and the worker hung until it was killed."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    stop = threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # A full pipe holds signals enough: the thread has them to read.
        with contextlib.suppress(BlockingIOError):
            os.write(write_end, bytes([signum]))

    def hear() -> None:
        while True:
            signum = os.read(read_end, 1)[0]
            if not stop.is_set():
                log.info("%s: %s", signal.Signals(signum).name, stopping)
            stop.set()

    threading.Thread(target=hear, name="signals", daemon=True).start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def wait_for(
    ready: Callable[[], object], timeout: float, what: str, children: Sequence[Child]
) -> float:
    """Poll `ready()` until it is true while every one of `children` runs;
    returns the seconds it took. ChildFailed, with the log's tail, if a child
    exits first or `timeout` passes."""
    started = time.monotonic()
    while True:
        for child in children:
            if not child.alive():
                raise ChildFailed(f"{child.name} exited ({child.returncode}):\n{child.log_tail()}")
        if ready():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            tail = f":\n{children[0].log_tail()}" if len(children) == 1 else ""
            raise ChildFailed(f"{what}: gave up after {timeout:g} s{tail}")
        time.sleep(POLL_S)


class Child:
    """`command` as a child process, its stdout and stderr in one log file.

    `log_path` defaults to a file in a temporary directory that goes when this
    object does. `new_session` puts the child in its own process group: Ctrl-C
    in a terminal reaches only us, and `kill` takes the child's own children
    (granian's web processes) along. `tied` sends it SIGTERM if we die, even by
    kill -9 (Linux; start it from the main thread, as the signal follows the
    thread that forked). `shared_output`: it writes to our stdout and stderr
    (one log for a parent and its children) and has no log file of its own.
    Can be started again once stopped; the log grows.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path | None = None,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        new_session: bool = False,
        tied: bool = False,
        shared_output: bool = False,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.new_session = new_session
        self.tied = tied
        self.shared_output = shared_output
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_path is None and not shared_output:
            self._tmp = tempfile.TemporaryDirectory(prefix="keras-server-")
            log_path = Path(self._tmp.name) / f"{name}.log"
        self.log_path = log_path or Path(os.devnull)  # shared output: nothing of its own to read
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        # Append mode: our reads never move the child's write position.
        with contextlib.ExitStack() as closing:
            out = None if self.shared_output else closing.enter_context(self.log_path.open("ab"))
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=None if self.shared_output else subprocess.STDOUT,
                start_new_session=self.new_session,
                # Only tiny prctl code runs in the child.
                preexec_fn=die_with_parent if self.tied and sys.platform == "linux" else None,  # noqa: PLW1509
            )
        return self

    def wait_until(self, ready: Callable[[], object], timeout: float, what: str = "ready") -> float:
        """Poll `ready()` until it is true; returns the seconds it took.

        Raises ChildFailed if the child exits first or `timeout` passes (the
        child is left running then: the caller decides).
        """
        return wait_for(ready, timeout, f"{self.name} {what}", [self])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; subprocess.TimeoutExpired if it takes longer."""
        if self.process is None:
            raise ChildFailed(f"{self.name} was never started")
        return self.process.wait(timeout)

    def send_signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)  # type: ignore[union-attr]

    def terminate(self) -> None:
        """SIGTERM, without waiting: to stop several children side by side."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, to its whole process group with `new_session`, as a crash would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 20) -> bool:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. True if it exited on
        its own (or had already), False if it had to be killed."""
        if self.process is None:
            return True
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %g s: killing it", self.name, timeout)
            # Our own processes write their threads' stacks to their log on
            # SIGUSR1 (stop_on_signals): what held it up, for whoever reads it.
            self.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(DUMP_WAIT_S)
            self.kill()
            return False
        return True

    def output(self) -> str:
        """Everything it printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
