"""The child-process helper every launcher uses: start with a log, wait until
ready, SIGTERM then kill, the log's tail; with real processes."""

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until

from keras_server.broker.redis_server import RedisServer, RedisUnavailable
from keras_server.processes import Child, ChildFailed


def python(name: str, code: str, **options: object) -> Child:
    return Child(name, [sys.executable, "-u", "-c", textwrap.dedent(code)], **options)


def gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_ready_then_stopped_by_sigterm_with_its_log() -> None:
    # The children below sleep a minute: they wait to be stopped or killed.
    child = python("sleeper", "import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    child.start()
    child.wait_until(lambda: "up" in child.output(), timeout=30, what="printing")
    assert child.alive()
    assert child.stop(timeout=10) is True
    assert child.returncode == -signal.SIGTERM
    assert child.log_tail(3) == "up\n"


def test_a_child_that_ignores_sigterm_is_killed_after_writing_its_stacks() -> None:
    """One of our processes that hears SIGTERM but does not stop: killed,
    after SIGUSR1 had it write where each thread was (stop_on_signals)."""
    child = python(
        "stubborn",
        """
        import logging, time
        from keras_server.processes import stop_on_signals
        logging.basicConfig(level=logging.INFO)
        stop_on_signals("not stopping")

        def stuck_somewhere():
            time.sleep(60)  # the child's: it waits to be killed

        print("ignoring", flush=True)
        stuck_somewhere()
        """,
    ).start()
    child.wait_until(lambda: "ignoring" in child.output(), timeout=30)
    assert child.stop(timeout=0.5) is False
    assert child.returncode == -signal.SIGKILL
    log = child.output()
    assert "SIGTERM: not stopping" in log
    assert "in stuck_somewhere" in log, log


def test_exiting_before_ready_fails_with_the_log() -> None:
    child = python("broken", "import sys\nsys.exit('bad configuration')\n").start()
    with pytest.raises(ChildFailed, match=r"broken exited \(1\):\nbad configuration"):
        child.wait_until(lambda: False, timeout=30)


def test_never_ready_gives_up_with_the_log(tmp_path: Path) -> None:
    child = python(  # never ready: it sleeps until stopped
        "slow", "import time\nprint('booting')\ntime.sleep(60)\n", log_path=tmp_path / "l"
    )
    with child:  # started once, by the with (child.start() here would start a second)
        with pytest.raises(ChildFailed, match=r"slow ready: gave up after 0.3 s:\n"):
            child.wait_until(lambda: False, timeout=0.3)
        assert child.alive(), "left running: the caller decides"
        wait_until(lambda: "booting" in (tmp_path / "l").read_text(), what="the log file")
    assert not child.alive()


def test_kill_takes_a_new_sessions_own_children() -> None:
    child = python(
        "parent",
        """
        import subprocess, sys, time
        # Both sleep until killed.
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(grandchild.pid, flush=True)
        time.sleep(60)
        """,
        new_session=True,
    ).start()
    child.wait_until(lambda: child.output().strip(), timeout=30, what="printing a pid")
    grandchild = int(child.output())
    child.kill()
    wait_until(lambda: gone(grandchild), timeout=10, what="the grandchild killed too")


def test_a_tied_child_gets_sigterm_when_its_parent_is_killed() -> None:
    parent = python(
        "parent",
        """
        import time
        from keras_server.processes import Child
        tied = Child("tied", ["sleep", "60"], tied=True).start()
        print(tied.pid, flush=True)
        time.sleep(60)  # the child's: it waits to be killed
        """,
        cwd=Path(__file__).resolve().parent.parent,
    ).start()
    parent.wait_until(lambda: parent.output().strip(), timeout=30, what="printing a pid")
    tied = int(parent.output())
    os.kill(parent.pid, signal.SIGKILL)
    wait_until(lambda: gone(tied), timeout=10, what="the tied child stopped")


def test_a_redis_server_that_cannot_start_says_why() -> None:
    with pytest.raises(RedisUnavailable, match="Bad directive"):
        RedisServer(extra_args=["--no-such-option", "1"]).start()


def test_free_ports_keep_to_their_class_and_are_never_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parallel test processes pick from classes of their own (KERAS_SERVER_PORTS
    "I/N"), and a port handed out is not handed out again before its server
    binds it (nothing binds these)."""
    from keras_server.broker import redis_server

    monkeypatch.setenv(redis_server.PORTS_ENV, "5/8")
    # 200 random picks of ~1,600 ports: without the memory, some would repeat.
    ports = [redis_server.free_port() for _ in range(200)]
    cluster = redis_server.free_cluster_port()
    assert {port % 8 for port in [*ports, cluster]} == {5}
    assert len(set(ports)) == len(ports)
    assert cluster not in ports and cluster + 10000 not in ports


def test_a_signal_that_comes_while_the_stop_event_is_busy_stops_the_process() -> None:
    """SIGTERM while the main thread holds the stop event's lock (as a first
    SIGTERM's handler did, setting it, when the launcher's forwarded SIGTERM
    came on top of the process group's): the event is set once the lock is
    free. A handler that set the event itself waited for its own lock
    forever (workers hung in test teardowns until killed)."""
    child = python(
        "twice-signalled",
        """
        import logging, os, signal, time
        from keras_server.processes import stop_on_signals
        logging.basicConfig(level=logging.INFO)
        stop = stop_on_signals("stopping")
        with stop._cond:  # the lock Event.set takes (threading's own)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs at the next bytecode
        print("handled", flush=True)
        print("stopped" if stop.wait(10) else "not stopped", flush=True)
        """,
    ).start()
    try:
        assert child.wait(timeout=30) == 0
    finally:
        child.stop(timeout=10)
    output = child.output()
    assert "SIGTERM: stopping" in output and output.endswith("handled\nstopped\n"), output
