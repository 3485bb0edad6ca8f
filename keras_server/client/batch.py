"""`keras-server classify PATH...`: classify a folder of images against a
running server, with a progress bar, resumable, from the command line.

Client side only: HTTP (requests), Pillow to recognise and shrink images, rich
for the progress bar; never an engine, TensorFlow, Redis or the web tier (an
import contract in pyproject.toml keeps it so). `pip install '.[client]'`
in the project's checkout installs what it needs.

What it does:
- walks the folders given (hidden files and folders skipped), and skips what
  Pillow cannot open as an image, saying why;
- shrinks a large photo before sending it, by a whole factor (a JPEG's DCT
  scale, a box reduction) to no less than twice the model's input each way
  (downscale.py, as `simple_request.py --downscale`), unless
  `--no-downscale`;
- sends `--batch` images per request (repeated `image` fields on
  `/predict`), `--concurrency` requests in flight;
- honours a 429 or 503's Retry-After, backing off exponentially (with jitter)
  when it is missing or shorter, up to `--retries` tries; an image whose own
  item is a 503 or 504 (the decoder busy, the model late) is retried alone;
- with `--job`, submits the images as asynchronous jobs (`POST /jobs`) of up
  to `--job-size` images and polls them instead;
- with `--explain DIR`, also asks `/explain` (occlusion, as PNG) for each
  image classified and saves the heat map over it in DIR, named after the
  image's path below the folders given (`sub__cat.jpg.explain.png`);
- writes one line per image to `--out` (JSON lines, or CSV when the name ends
  .csv), flushed as results come; run again with the same `--out`, it skips
  the images that file already records as classified (failures are tried
  again);
- ends with a summary (counts per top label, the failures) and exits 1 when
  any image failed, naming them; 2 when it cannot start (no images, the
  server unreachable, a bad flag).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from keras_server.client.downscale import downscale_for_upload
from keras_server.client.http import BACKOFF_FIRST_S, BACKOFF_MAX_S, ClientError, Server, error_of
from keras_server.client.results import Outcome, Output

log = logging.getLogger(__name__)

# An item of a several-image answer worth another try: the decoder's memory
# budget was spent (503) or the model did not answer in time (504).
RETRYABLE_ITEM = frozenset({503, 504})
Upload = tuple[str, tuple[str, bytes]]  # an `image` field: its name, the file's name and bytes
JOB_POLL_S = 0.5


# -- finding images ------------------------------------------------------------


def walk(paths: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """Every file under `paths`, in a stable order, with why it is skipped
    (None for an image to classify)."""
    for given in paths:
        root = Path(given)
        if root.is_dir():
            for folder, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        path = os.path.join(folder, name)
                        yield path, not_an_image(path)
        elif root.exists():
            yield given, not_an_image(given)
        else:
            yield given, "no such file or folder"


def not_an_image(path: str) -> str | None:
    """Why `path` is not an image to send (None when it is one): Pillow reads
    its header only, so this costs a few hundred bytes per file."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.size  # noqa: B018 (the header is read: a format Pillow knows)
    except Image.DecompressionBombError:
        return None  # an image; the server says how large is too large
    except PermissionError:
        return "cannot read it (permission denied)"
    except Image.UnidentifiedImageError:
        return "not an image Pillow can read"
    except OSError as exc:
        if exc.errno is not None:  # the file itself: gone, a folder, unreadable
            return f"cannot read it ({exc.strerror})"
        return f"not an image Pillow can read ({exc})"
    except (ValueError, SyntaxError, EOFError):
        return "not an image Pillow can read"
    return None


# -- sending images ------------------------------------------------------------


class Sender:
    """Reads, shrinks and sends images; every image ends as one Outcome."""

    def __init__(self, server: Server, model: str | None, size: tuple[int, int] | None) -> None:
        self.server = server
        self.predict_path = f"/models/{model}/predict" if model else "/predict"
        self.explain_path = f"/models/{model}/explain" if model else "/explain"
        self.model = model
        self.size = size

    def payload(self, path: str) -> bytes:
        with open(path, "rb") as f:
            data = f.read()
        return downscale_for_upload(data, self.size) if self.size else data

    def _read(self, paths: Sequence[str]) -> tuple[list[Upload], dict[str, Outcome]]:
        """The `image` fields of the `paths` that can be read; an Outcome for each other."""
        files, outcomes = [], {}
        for path in paths:
            try:
                files.append(("image", (os.path.basename(path), self.payload(path))))
            except OSError as exc:
                outcomes[path] = Outcome(path, False, error=f"cannot read it: {exc}")
        return files, outcomes

    def send(self, paths: Sequence[str]) -> list[Outcome]:
        """`paths` in one request (repeated `image` fields), their outcomes in order."""
        files, outcomes = self._read(paths)
        sending = [p for p in paths if p not in outcomes]
        for attempt in range(self.server.retries + 1):
            if not sending:
                break
            try:
                answers = self._post(files)
            except ClientError as exc:
                outcomes.update({p: Outcome(p, False, error=str(exc)) for p in sending})
                break
            retry = []
            for path, upload, answer in zip(sending, files, answers, strict=True):
                status = answer.get("status", 200 if answer.get("success") else 500)
                if status in RETRYABLE_ITEM and attempt < self.server.retries:
                    retry.append((path, upload))
                else:
                    outcomes[path] = Outcome.of(path, answer)
            sending = [p for p, _ in retry]
            files = [u for _, u in retry]
            if retry:
                self.server.sleep(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt))
        return [outcomes[p] for p in paths]

    def _post(self, files: list[Upload]) -> list[dict[str, Any]]:
        """One item per file; a whole-request failure is every file's."""
        response = self.server.call("POST", self.predict_path, files=files)
        try:
            body = response.json()
        except ValueError:
            body = {"success": False, "error": response.text[:200] or response.reason}
        if len(files) > 1 and response.status_code == 200 and "results" in body:
            return list(body["results"])
        if len(files) == 1 and isinstance(body, dict) and "success" in body:
            return [{**body, "status": response.status_code}]
        failure = {
            "success": False,
            "status": response.status_code,
            "error": f"{response.status_code}: {body.get('error') or error_of(response)}",
        }
        return [failure] * len(files)

    def explain(self, path: str, overlay: Path) -> str | None:
        """The heat map of `path`'s answer over it, saved as `overlay`; what
        went wrong, or None."""
        try:
            files = [("image", (os.path.basename(path), self.payload(path)))]
            response = self.server.call(
                "POST", self.explain_path, files=files, data={"format": "png"}
            )
        except (OSError, ClientError) as exc:
            return str(exc)
        if response.status_code != 200:
            return f"{response.status_code}: {error_of(response)}"
        overlay.write_bytes(response.content)
        return None

    def send_as_job(self, paths: Sequence[str]) -> list[Outcome]:
        """`paths` as one asynchronous job: submitted, polled until done,
        its results read back page by page."""
        files, outcomes = self._read(paths)
        sending = [p for p in paths if p not in outcomes]
        if sending:
            data = {"model": self.model} if self.model else None
            response = self.server.call("POST", "/jobs", files=files, data=data)
            if response.status_code != 202:
                error = f"{response.status_code}: {error_of(response)}"
                outcomes.update({p: Outcome(p, False, error=error) for p in sending})
            else:
                results = self._await_job(response.json()["status_url"])
                for path, item in zip(sending, results, strict=True):
                    outcomes[path] = Outcome.of(path, item)
        return [outcomes[p] for p in paths]

    def _await_job(self, status_url: str) -> list[dict[str, Any]]:
        while True:
            response = self.server.call("GET", status_url, params={"limit": 0})
            if response.status_code != 200:
                raise ClientError(f"GET {status_url}: {response.status_code} {error_of(response)}")
            job = response.json()
            if job["state"] in ("done", "cancelled"):
                break
            self.server.sleep(JOB_POLL_S)
        results: list[dict[str, Any]] = []
        while len(results) < job["total"]:
            page = self.server.call("GET", status_url, params={"offset": len(results)})
            if page.status_code != 200:
                raise ClientError(f"GET {status_url}: {page.status_code} {error_of(page)}")
            items = page.json()["results"]
            if not items:
                break
            results += items
        missing = {"success": False, "error": f"the job ended {job['state']}"}
        return results + [missing] * (job["total"] - len(results))


# -- the run -------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    """Images per second, over the whole run so far."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("-- img/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:.1f} img/s", style="progress.data.speed")


def chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def say(console: Console, text: str) -> None:
    """A plain line: no markup, colours or wrapping (paths stay whole)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def scan(paths: Sequence[str], already: set[str], console: Console) -> tuple[list[str], int]:
    """The images under `paths` not `already` classified; how many files
    were skipped, each said with why."""
    todo: list[str] = []
    skipped = 0
    for path, why in walk(paths):
        if path in already:
            continue
        if why:
            skipped += 1
            say(console, f"skipped {path}: {why}")
        else:
            todo.append(path)
    return todo, skipped


def run(args: argparse.Namespace, console: Console, sleep: Callable[[float], None]) -> int:
    server = Server(args.url.rstrip("/"), args.api_key, args.timeout, args.retries, sleep)
    output = Output(args.out)
    recorded = output.done()
    already = {path for path, outcome in recorded.items() if outcome.success}
    todo, skipped = scan(args.paths, already, console)
    if not todo and not already:
        raise ClientError("no images to classify")
    size = server.model_input_size(args.model) if args.downscale else None
    sender = Sender(server, args.model, size)
    work, per_call = (sender.send_as_job, args.job_size) if args.job else (sender.send, args.batch)
    if args.explain and todo:
        work = explained(work, sender, Path(args.explain), os.path.commonpath(todo), console)
    if already:
        say(console, f"{len(already)} images already classified in {args.out}: skipped")
    outcomes: list[Outcome] = [recorded[p] for p in sorted(already)]
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    progress = Progress(*columns, console=console, disable=args.quiet)
    with output, progress, ThreadPoolExecutor(args.concurrency) as pool:
        task = progress.add_task("classifying", total=len(todo))
        pending: set[Future[list[Outcome]]] = set()
        groups = chunks(todo, per_call)
        while True:
            # At most 2 x concurrency calls in hand: the rest wait as paths only.
            for group in itertools.islice(groups, 2 * args.concurrency - len(pending)):
                pending.add(pool.submit(work, group))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                for outcome in future.result():
                    output.write(outcome)
                    outcomes.append(outcome)
                    progress.advance(task)
    return summarize(outcomes, skipped, console)


def explained(
    work: Callable[[Sequence[str]], list[Outcome]],
    sender: Sender,
    directory: Path,
    root: str,
    console: Console,
) -> Callable[[Sequence[str]], list[Outcome]]:
    """`work`, then each image classified explained into `directory`
    (`--explain`): its overlay named after its path below `root`."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.path.isfile(root):  # one image: named after itself
        root = os.path.dirname(root)

    def classify_and_explain(paths: Sequence[str]) -> list[Outcome]:
        outcomes = work(paths)
        for outcome in outcomes:
            if not outcome.success:
                continue
            name = "__".join(Path(os.path.relpath(outcome.path, root)).parts) + ".explain.png"
            error = sender.explain(outcome.path, directory / name)
            if error:
                say(console, f"could not explain {outcome.path}: {error}")
        return outcomes

    return classify_and_explain


def summarize(outcomes: Sequence[Outcome], skipped: int, console: Console) -> int:
    """The summary table and the failures; the exit status (1 if any failed)."""
    labels = collections.Counter(o.top_label for o in outcomes if o.success)
    failed = [o for o in outcomes if not o.success]
    table = Table(title="top labels", show_header=True)
    table.add_column("label")
    table.add_column("images", justify="right")
    for label, count in labels.most_common(20):
        table.add_row(str(label), str(count))
    if len(labels) > 20:
        table.add_row(f"({len(labels) - 20} more labels)", str(sum(labels.values()) - sum(
            count for _, count in labels.most_common(20))))  # fmt: skip
    if labels:
        console.print(table)
    say(
        console,
        f"{len(outcomes) - len(failed)} classified, {len(failed)} failed, {skipped} skipped",
    )
    if failed:
        console.print(f"{len(failed)} images failed:", style="bold red")
        for outcome in failed:
            say(console, f"  {outcome.path}: {outcome.error}")
        return 1
    return 0


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Classify images (files or whole folders) with a running keras-server.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--url", required=True, help="the server, e.g. http://localhost:5000")
    p.add_argument(
        "--api-key",
        default=os.environ.get("KERAS_SERVER_API_KEY"),
        help="sent as a bearer token (default: $KERAS_SERVER_API_KEY)",
    )
    p.add_argument("--out", help="results file, appended to: JSON lines, or CSV if it ends .csv")
    p.add_argument("--concurrency", type=_positive, default=8, help="requests in flight")
    p.add_argument(
        "--batch", type=_positive, default=8, help="images per request (the server's --max-images)"
    )
    p.add_argument("--model", help="the model to ask (default: the server's default)")
    p.add_argument("--job", action="store_true", help="use the asynchronous job API (POST /jobs)")
    p.add_argument(
        "--explain",
        metavar="DIR",
        help="also save each image's heat map (POST /explain) over it in DIR, as PNG",
    )
    p.add_argument("--job-size", type=_positive, default=100, help="images per job with --job")
    p.add_argument(
        "--no-downscale",
        dest="downscale",
        action="store_false",
        help="send photos as they are (default: shrink to twice the model's input)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument(
        "--retries", type=int, default=10, help="tries after a 429/503 or a connection error"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(
    argv: Sequence[str],
    prog: str = "keras-server classify",
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the batch client on `argv`; the exit status. `sleep`: every wait
    between tries goes through it (tests record them)."""
    args = parser(prog).parse_args(argv)
    console = Console(stderr=True)
    try:
        return run(args, console, sleep)
    except ClientError as exc:
        say(console, f"{prog}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to resume", soft_wrap=True)
        return 130
