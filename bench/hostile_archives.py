"""Peak memory of the web processes under concurrent hostile job archives.

Starts `run_keras_server.py --model sim` (flags after `--` go to it; --root
serves another checkout, e.g. a `git worktree` of the code before a change)
on a private redis-server, then POSTs --clients archives to /jobs at once,
--rounds times, each small on the wire:

- `tar-gz-zeros`: a .tar.gz of one member of --member-mb zero bytes (about
  a thousandth of that on the wire: gzip members of a MiB of zeros each);
- `tar-gz-hidden`: a .tar.gz of hidden members of 15 MB of zeros each (under
  --max-upload-mb), --member-mb in all: skipped, but inflated;
- `zip-zeros`: a zip of one deflated member of --member-mb zero bytes;
- `zip-entries`: a zip of --entries empty hidden files.

It samples the resident memory of every process of the server's tree
(psutil, every 20 ms) and prints the peak of their sum against the sum
before, the sum of each process's own peak (VmHWM) before and after, the
answers by status, and the CPU model. Sampling stops the server
when the sum passes --ceiling-mb, so that a server that inflates what it is
sent cannot take a shared machine down: the peak is then "over the ceiling".

    python -m bench.hostile_archives --clients 16
    python -m bench.hostile_archives --root /tmp/before --clients 16
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from bench import cpu
from keras_server.broker.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def zeros_tar_gz(name: str, size: int, count: int = 1) -> bytes:
    """A .tar.gz of `count` members of `size` zero bytes, named `name` (then
    `name` and its number, from the second on). A gzip file may be several
    gzip members (RFC 1952), and a tar's data, padding and end blocks are
    all zeros: each header's gzip member, then one of a MiB of zeros
    repeated, about 1 KB each."""
    block = gzip.compress(bytes(MIB), 9, mtime=0)
    padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    parts = []
    for index in range(count):
        info = tarfile.TarInfo(f"{name}{index or ''}")
        info.size = size
        zeros = padded + (2 * tarfile.BLOCKSIZE if index == count - 1 else 0)
        whole, rest = divmod(zeros, MIB)
        parts += [gzip.compress(info.tobuf(tarfile.GNU_FORMAT), mtime=0), block * whole]
        parts.append(gzip.compress(bytes(rest), 9, mtime=0))
    return b"".join(parts)


def zeros_zip(name: str, size: int) -> bytes:
    """A zip of one deflated member `name` of `size` zero bytes."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open(name, "w", force_zip64=size > 0xFFFFFFFF) as member,
    ):
        block = bytes(MIB)
        for start in range(0, size, MIB):
            member.write(block[: min(MIB, size - start)])
    return buffer.getvalue()


def entries_zip(count: int) -> bytes:
    """A zip of `count` empty hidden files (zipfile writes its ZIP64 end
    records past 65535 entries)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(count):
            archive.writestr(f".{index}", b"")
    return buffer.getvalue()


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of `root` and every process under it."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


def tree_hwm(root: psutil.Process) -> int:
    """The sum of each process's own peak resident bytes (VmHWM): a bound on
    the tree's peak that sampling cannot miss (each process's peak may come
    at its own time)."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(OSError, psutil.NoSuchProcess):
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


class Sampler(threading.Thread):
    """The peak of tree_rss, every 20 ms; the server is killed over `ceiling`."""

    def __init__(self, root: psutil.Process, ceiling: int) -> None:
        super().__init__(daemon=True)
        self.root, self.ceiling = root, ceiling
        self.peak = 0
        self.over = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, tree_rss(self.root))
            if self.peak > self.ceiling:
                self.over = True
                for process in [*self.root.children(recursive=True), self.root]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
                return


def wait_ready(base: str, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(base + "/readyz", timeout=1).status_code == 200:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    return False


def send_rounds(
    base: str, archives: dict[str, bytes], sends: list[str], rounds: int, sampler: Sampler
) -> Counter[tuple[str, str]]:
    """`rounds` times, every archive of `sends` POSTed to /jobs at once: the
    answers (status and error) by kind."""
    answers: Counter[tuple[str, str]] = Counter()
    for _ in range(rounds):
        barrier = threading.Barrier(len(sends))

        def send(kind: str, barrier: threading.Barrier = barrier) -> tuple[str, str]:
            barrier.wait()
            try:
                response = requests.post(
                    base + "/jobs", files={"archive": (kind, archives[kind])}, timeout=300
                )
            except requests.RequestException as exc:
                return kind, type(exc).__name__
            json = response.headers.get("Content-Type", "").startswith("application/json")
            error = response.json().get("error", "") if json else response.text
            return kind, f"{response.status_code} {error}"

        with ThreadPoolExecutor(len(sends)) as pool:
            for kind, answer in pool.map(send, sends):
                answers[kind, answer[:110]] += 1
        if sampler.over:
            break
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="archives at once")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--member-mb", type=int, default=900, help="the zero member's size")
    parser.add_argument("--entries", type=int, default=200_000, help="zip-entries' files")
    parser.add_argument("--kinds", default="tar-gz-zeros,zip-zeros,zip-entries")
    parser.add_argument("--ceiling-mb", type=int, default=8000, help="kill the server past it")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to serve from")
    parser.add_argument("server_args", nargs="*", help="after --: flags for the server")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu.model()}")
    builders = {
        "tar-gz-zeros": lambda: zeros_tar_gz("zeros.png", args.member_mb * MIB),
        "tar-gz-hidden": lambda: zeros_tar_gz(".hidden", 15 * MIB, args.member_mb // 15),
        "zip-zeros": lambda: zeros_zip("zeros.png", args.member_mb * MIB),
        "zip-entries": lambda: entries_zip(args.entries),
    }
    kinds = args.kinds.split(",")
    archives = {kind: builders[kind]() for kind in kinds}
    for kind, data in archives.items():
        print(f"{kind:13s} {len(data) / MIB:7.2f} MB on the wire")
    with RedisServer() as redis_server:
        port = free_port()
        process = subprocess.Popen(
            [
                sys.executable, "run_keras_server.py", "--model", "sim", "--port", str(port),
                "--redis-url", redis_server.url, "--log-level", "ERROR",
                "--sim-batch-ms", "1", "--sim-image-ms", "0", *args.server_args,
            ],
            cwd=args.root,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(base, process):
                print("the server did not start", file=sys.stderr)
                return 1
            root = psutil.Process(process.pid)
            before, hwm_before = tree_rss(root), tree_hwm(root)
            sampler = Sampler(root, args.ceiling_mb * MIB)
            sampler.start()
            started = time.monotonic()
            sends = [kinds[i % len(kinds)] for i in range(args.clients)]
            answers = send_rounds(base, archives, sends, args.rounds, sampler)
            elapsed = time.monotonic() - started
            hwm_after = 0 if sampler.over else tree_hwm(root)
            sampler.done.set()
            sampler.join()
            print(f"\n{args.clients} archives at once, {args.rounds} rounds, {elapsed:.1f} s:")
            for (kind, answer), count in sorted(answers.items()):
                print(f"  {kind:13s} x{count}: {answer}")
            peak = "over the ceiling" if sampler.over else f"{sampler.peak / MIB:.0f} MB"
            print(
                f"server tree resident memory: {before / MIB:.0f} MB before, peak {peak} "
                f"(+{(sampler.peak - before) / MIB:.0f} MB, sampled every 20 ms)"
            )
            if hwm_after:
                print(
                    f"sum of each process's peak (VmHWM): {hwm_before / MIB:.0f} MB before, "
                    f"{hwm_after / MIB:.0f} MB after (+{(hwm_after - hwm_before) / MIB:.0f} MB)"
                )
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
