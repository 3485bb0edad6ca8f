"""Quotas per API key: the keys file's fields (examples and Hypothesis), the
GCRA script's arithmetic against real Redis, the 429 and RateLimit-* headers
in each API's shape, metrics by key name, quotas left unenforced (never a
500) when Redis cannot be asked, and one quota shared by two granian web
processes."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import string
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from conftest import (
    CHELSEA,
    COFFEE,
    WorkerThread,
    make_worker,
    post_images,
    start_web,
    stop,
    wait_until,
)
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest
from prometheus_client.multiprocess import MultiProcessCollector
from test_openapi import INFER, SPEC, Call, conforms, infer_json
from werkzeug.datastructures import FileStorage
from werkzeug.test import EnvironBuilder, encode_multipart

from keras_server.broker.messages import Keys
from keras_server.broker.quotas import MICROS, Decision, Quota, Quotas
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving import keys as auth
from keras_server.serving import quotas
from keras_server.settings import Settings
from keras_server.web.app import create_app

ALICE = "alice-key-0123456789abcdef"
BOB = "bob.key~with/signs+0123456789=="
OPEN = "no-quota-key-0123456789abcdef"
DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


# -- the keys file ------------------------------------------------------------


def test_the_fields_after_a_key() -> None:
    keys = auth.parse_keys(
        "# KEY [name=NAME] [rate=N/UNIT [burst=N]]\n"
        f"{ALICE}  name=alice rate=10/s burst=20   # the web app\n"
        f"\t{BOB} rate=600/min name=bob\n"
        f"{OPEN}\n"
        "\n"
        f"{ALICE[::-1]} burst=3 rate=2/h name=old.alice_2\n"
        f"rotated-key-0123456789abc name=bob rate=600/min burst=600\n"
        f"daily-key-0123456789abcdef rate=1000/d\n"
    )
    entries = {e.name: e for e in keys.entries}
    assert entries["alice"].quota == Quota(rate=10, period=1, burst=20)
    assert entries["bob"].quota == Quota(rate=600, period=60, burst=600)  # burst: N
    assert entries["line-4"].quota is None  # a bare key, as before: named by its line
    assert entries["old.alice_2"].quota == Quota(rate=2, period=3600, burst=3)
    assert entries["line-8"].quota == Quota(rate=1000, period=86400, burst=1000)
    assert keys.identify(ALICE) == entries["alice"]
    # Two keys, one name (a rotation): the same quota.
    assert keys.identify(BOB).name == keys.identify("rotated-key-0123456789abc").name == "bob"
    assert keys.identify(ALICE + "x") is None
    assert len(keys) == 6


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"{ALICE} surname", "after the key come only the fields name=, rate=, burst="),
        (f"{ALICE} colour=red", "after the key come only the fields"),
        (f"{ALICE} name=a name=b", "name= is given twice"),
        (f"{ALICE} name=", "a name is 1 to 64 letters"),
        (f"{ALICE} name=has:colon", "a name is 1 to 64 letters"),
        (f"{ALICE} name={'n' * 65}", "a name is 1 to 64 letters"),
        (f"{ALICE} burst=5", "burst= needs a rate="),
        (f"{ALICE} rate=10", "rate= is N/s, N/min, N/h or N/d"),
        (f"{ALICE} rate=0/s", "N a whole number from 1 to 1000000"),
        (f"{ALICE} rate=1.5/s", "rate= is N/s"),
        (f"{ALICE} rate=10/week", "rate= is N/s"),
        (f"{ALICE} rate=\u0661\u0660/s", "rate= is N/s"),  # Arabic-Indic digits
        (f"{ALICE} rate=2000000/s", "from 1 to 1000000"),
        (f"{ALICE} rate=1/s burst=0", "burst= is a whole number from 1 to 1000000"),
        (f"{ALICE} rate=1/s burst=-1", "burst= is a whole number"),
        (f"{ALICE} rate=1/s burst=\u00b2", "burst= is a whole number"),
        ("has a space in it 0123456789", "a key must be at least 16 characters"),
    ],
)
def test_bad_fields_name_the_line_never_the_key(line: str, message: str) -> None:
    with pytest.raises(auth.KeysFileError, match=re.escape(message)) as caught:
        auth.parse_keys(f"# first\n{line}\n", "keys.txt")
    assert "keys.txt, line 2:" in str(caught.value)
    assert ALICE not in str(caught.value)


def test_keys_and_names_twice() -> None:
    with pytest.raises(auth.KeysFileError, match="line 3: the same key as line 1"):
        auth.parse_keys(f"{ALICE} name=a\n{BOB}\n{ALICE} name=b\n")
    with pytest.raises(auth.KeysFileError, match="line 2: the name 'a' is on line 1 with another"):
        auth.parse_keys(f"{ALICE} name=a rate=1/s\n{BOB} name=a rate=2/s\n")
    # Same name, same quota: fine; an unnamed key's name is its line's.
    auth.parse_keys(f"{ALICE} name=a rate=1/s burst=1\n{BOB} rate=1/s name=a\n")
    shared = auth.parse_keys(f"{ALICE} name=line-2\n{BOB}\n")
    assert {e.name for e in shared.entries} == {"line-2"}


KEY_TEXT = st.text(string.ascii_letters + string.digits + "._~+/-", min_size=16, max_size=40)
NAMES = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=64)
UNITS = st.sampled_from(sorted(auth.PERIODS))
QUOTAS = st.none() | st.builds(
    lambda rate, unit, burst: (rate, unit, burst),
    st.integers(1, auth.MAX_COUNT),
    UNITS,
    st.none() | st.integers(1, auth.MAX_COUNT),
)
SPACE = st.sampled_from([" ", "  ", "\t", " \t "])


@st.composite
def keys_files(draw: st.DrawFn) -> tuple[str, list[tuple[str, str | None, tuple | None]]]:
    """A valid keys file, and what it says: (key, name, (rate, unit, burst))."""
    keys = draw(st.lists(KEY_TEXT, min_size=1, max_size=6, unique=True))
    lines, expected = [], []
    for key in keys:
        name = draw(st.none() | NAMES.filter(lambda n: not n.startswith("line-")))
        quota = draw(QUOTAS)
        if name is not None and any(name == n for _, n, _ in expected):
            name = None  # a shared name needs the same quota: tested above
        fields = []
        if name is not None:
            fields.append(f"name={name}")
        if quota is not None:
            rate, unit, burst = quota
            fields.append(f"rate={rate}/{unit}")
            if burst is not None:
                fields.append(f"burst={burst}")
        fields = draw(st.permutations(fields))
        words = [key, *fields]
        if draw(st.booleans()):
            words.append("# " + draw(st.text(string.printable.strip(), max_size=10)))
        line = draw(SPACE).join(words)
        lines += [line, *draw(st.lists(st.sampled_from(["", "# note", "   "]), max_size=2))]
        expected.append((key, name, quota))
    return "\n".join(lines), expected


@given(keys_files())
def test_any_valid_file_reads_back(case: tuple[str, list]) -> None:
    text, expected = case
    keys = auth.parse_keys(text)
    assert len(keys) == len(expected)
    for key, name, quota in expected:
        entry = keys.identify(key)
        assert entry is not None
        assert entry.name == (name or f"line-{entry.line}")
        if quota is None:
            assert entry.quota is None
        else:
            rate, unit, burst = quota
            assert entry.quota == Quota(rate, auth.PERIODS[unit], burst or rate)


@given(st.text(max_size=300) | st.lists(st.text(max_size=30), max_size=8).map(" ".join))
def test_any_text_is_read_or_refused_by_line_never_echoing_a_key(text: str) -> None:
    try:
        auth.parse_keys(text, "keys.txt")
    except auth.KeysFileError as exc:
        message = str(exc)
        assert message.startswith("keys.txt")
        # The first word of a line is where a key stands: never shown.
        for line in text.splitlines():
            words = line.split()
            if words and len(words[0]) >= 8:
                assert words[0] not in message


# -- the script, against real Redis ---------------------------------------------


@pytest.fixture
def store(settings: Settings) -> Quotas:
    return Quotas.open(settings.redis_url, Keys(settings.queue_name), timeout=1)


def test_gcra_arithmetic(store: Quotas, redis_client: redis.Redis, settings: Settings) -> None:
    quota = Quota(rate=2, period=1, burst=3)  # one every 0.5 s, 3 at once
    t = 1_700_000_000 * MICROS

    def take(at_s: float) -> Decision:
        return store.take("alice", quota, now_us=t + round(at_s * MICROS))

    # A full bucket: 3 at once, the third leaving nothing.
    assert [take(0).remaining for _ in range(3)] == [2, 1, 0]
    refused = take(0)
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert refused.retry_after_s == 0.5  # one interval until a token returns
    assert refused.reset_s == 1.5  # three intervals until the bucket is full
    assert refused.headers == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "2",
        "Retry-After": "1",
    }
    # A refusal takes nothing: just before the interval still refused, at it allowed.
    assert take(0.499999).allowed is False
    at_half = take(0.5)
    assert (at_half.allowed, at_half.remaining, at_half.reset_s) == (True, 0, 1.5)
    # The state is one timestamp, expiring when the bucket is full again.
    key = Keys(settings.queue_name).quota("alice")
    assert int(redis_client.get(key)) == t + 2 * MICROS
    assert 0 < redis_client.pttl(key) <= 2000
    # 1.25 s later: two and a half intervals have passed since then; two whole
    # tokens are back, the next one not yet.
    later = take(1.75)
    assert (later.allowed, later.remaining) == (True, 1)
    # Long idle: full again, whatever happened before.
    assert take(100).remaining == 2
    # Each name is its own quota.
    assert store.take("bob", quota, now_us=t + 100 * MICROS).remaining == 2


def test_gcra_sustained_rate_and_burst_one(store: Quotas) -> None:
    quota = Quota(rate=10, period=60, burst=1)  # one every 6 s, none saved up
    t = 1_800_000_000 * MICROS
    allowed = [store.take("steady", quota, now_us=t + s * MICROS).allowed for s in range(0, 60, 2)]
    # Every third 2-second tick passes: 10 in 60 s, evenly spread.
    assert allowed == [True, False, False] * 10
    assert store.take("steady", quota, now_us=t + 60 * MICROS).headers["RateLimit-Limit"] == "1"


def test_gcra_on_redis_time(store: Quotas) -> None:
    quota = Quota(rate=1, period=3600, burst=4)
    started = time.monotonic()
    answers = [store.take("clocked", quota) for _ in range(5)]
    took = time.monotonic() - started
    assert [a.allowed for a in answers] == [True] * 4 + [False]
    assert [a.remaining for a in answers] == [3, 2, 1, 0, 0]
    # An hour after the first take, less the time the takes took (however
    # slow the machine was), rounded up to whole seconds in the header.
    assert 3600 - took - 0.01 < answers[-1].retry_after_s <= 3600
    assert 3600 - took - 1 <= int(answers[-1].headers["Retry-After"]) <= 3600


# -- in the app ---------------------------------------------------------------


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(f"{ALICE} name=alice rate=1/h burst=2\n{OPEN}\n")
    return path


@pytest.fixture
def keyed(settings: Settings, keys_file: Path) -> Settings:
    return dataclasses.replace(settings, api_keys=str(keys_file), metrics_key_names=True)


@pytest.fixture
def openapi() -> OpenAPI:
    return OpenAPI.from_dict({**SPEC, "servers": [{"url": "http://localhost/"}]})


@pytest.fixture
def model(settings: Settings) -> Iterator[None]:
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        yield


def metric(client: FlaskClient, name: str, quota: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    found = re.search(
        rf'^keras_server_api_key_requests_total{{key_name="{name}",quota="{quota}"}} (\S+)$',
        text,
        re.MULTILINE,
    )
    return float(found[1]) if found else 0.0


def test_over_quota_is_429_in_each_apis_shape(
    keyed: Settings, model: None, openapi: OpenAPI
) -> None:
    client = create_app(keyed).test_client()
    counted = ("alice", "within"), ("alice", "over"), ("line-2", "none")
    before = {c: metric(client, *c) for c in counted}
    alice = {"X-API-Key": ALICE}
    started = time.monotonic()
    first = post_images(client, CHELSEA, headers=alice)
    assert first.status_code == 200
    assert first.headers["RateLimit-Limit"] == "2"
    assert first.headers["RateLimit-Remaining"] == "1"
    assert "Retry-After" not in first.headers
    # A request with no image counts nothing, and says what is left.
    empty = client.post("/predict", headers=alice)
    assert (empty.status_code, empty.headers["RateLimit-Remaining"]) == (400, "1")
    # Two images with one left: refused whole, nothing counted.
    both = post_images(client, CHELSEA, COFFEE, headers=alice)
    assert both.status_code == 429
    assert "(2 images sent, 1 left now)" in both.get_json()["error"]
    assert post_images(client, CHELSEA, headers=alice).status_code == 200

    refused = post_images(client, CHELSEA, headers=alice)
    took = int(time.monotonic() - started) + 1  # the hour counts from the first request
    assert refused.status_code == 429
    body = refused.get_json()
    assert body["success"] is False
    assert body["error"].startswith(
        "the API key 'alice' is over its quota of 1 image an hour, 2 at once; retry in"
    )
    assert ALICE not in body["error"]
    assert 3600 - took <= int(refused.headers["Retry-After"]) <= 3600
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert 7200 - took <= int(refused.headers["RateLimit-Reset"]) <= 7200

    v2 = client.get("/v2/models/resnet50", headers={"Authorization": f"Bearer {ALICE}"})
    assert v2.status_code == 429
    assert set(v2.get_json()) == {"error"}
    assert "over its quota" in v2.get_json()["error"]
    assert "Retry-After" in v2.headers

    # Against the description: both shapes, their headers.
    part = FileStorage(io.BytesIO(CHELSEA), "upload.png", content_type="image/png")
    boundary, body = encode_multipart({"image": part})
    multipart = f"multipart/form-data; boundary={boundary}"
    conforms(openapi, with_headers(client, "/predict", body, multipart, alice), 429)
    infer = with_headers(client, INFER, infer_json(CHELSEA), "application/json", alice)
    conforms(openapi, infer, 429)

    # A key without a quota is never metered; an open path never asks for one.
    free = post_images(client, CHELSEA, headers={"X-API-Key": OPEN})
    assert free.status_code == 200
    assert "RateLimit-Limit" not in free.headers
    assert client.get("/healthz").status_code == 200
    after = {c: metric(client, *c) - before[c] for c in counted}
    assert after == {("alice", "within"): 2, ("alice", "over"): 5, ("line-2", "none"): 1}
    metrics_text = client.get("/metrics").get_data(as_text=True)
    assert ALICE not in metrics_text
    assert OPEN not in metrics_text


def with_headers(
    client: FlaskClient, path: str, body: bytes, content_type: str, headers: dict
) -> Call:
    """test_openapi's `call`, with request headers."""

    def build() -> EnvironBuilder:
        return EnvironBuilder(
            path=path, method="POST", data=body, content_type=content_type, headers=headers
        )

    response = client.open(build())
    return Call(WerkzeugOpenAPIRequest(build().get_request()), response)


def test_unreachable_redis_lets_requests_through_counted_and_logged_once(
    keyed: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    down = dataclasses.replace(keyed, redis_url=DOWN)
    client = create_app(down).test_client()
    before = metric(client, "alice", "unenforced")
    with caplog.at_level(logging.INFO, logger=quotas.__name__):
        answers = [client.get("/models", headers={"X-API-Key": ALICE}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4  # more than the burst of 2
    assert all("RateLimit-Limit" not in a.headers for a in answers)
    assert metric(client, "alice", "unenforced") - before == 4
    warnings = [r for r in caplog.records if r.name == quotas.__name__]
    assert len(warnings) == 1
    assert "quotas are not enforced: Redis at 127.0.0.1:1/0 is unreachable" in warnings[0].message


def test_a_refusing_redis_lets_requests_through_a_bug_is_500(
    keyed: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_app(keyed).test_client()
    failure: list[Exception] = [redis.exceptions.ReadOnlyError("You can't write against a replica")]

    def failing(*args: object, **kwargs: object) -> Decision:
        raise failure[0]

    monkeypatch.setattr(Quotas, "_run", failing)
    before = metric(client, "alice", "unenforced")
    with caplog.at_level(logging.INFO, logger=quotas.__name__):
        assert client.get("/models", headers={"X-API-Key": ALICE}).status_code == 200
        assert metric(client, "alice", "unenforced") - before == 1
        monkeypatch.undo()
        assert client.get("/models", headers={"X-API-Key": ALICE}).status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == quotas.__name__]
    assert "is refused (READONLY You can't write against a replica)" in messages[0]
    assert messages[1].startswith("API key quotas are enforced again")

    failure[0] = redis.RedisError("a reply we cannot parse")
    monkeypatch.setattr(Quotas, "_run", failing)
    bug = client.get("/models", headers={"X-API-Key": ALICE})
    assert bug.status_code == 500
    assert "parse" not in bug.get_json()["error"]


# -- two web processes, one quota -----------------------------------------------


def counting_processes(process_id: int) -> set[str]:
    """The web processes that counted a keyed request: prometheus-client's
    multiprocess directory holds a file per process (counter_<pid>.db),
    read one at a time."""
    environ = Path(f"/proc/{process_id}/environ").read_bytes().split(b"\0")
    directory = next(
        v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
    )
    found = set()
    for path in Path(directory).glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(path)], accumulate=False):
            if family.name == "keras_server_api_key_requests" and any(
                sample.value for sample in family.samples
            ):
                found.add(path.stem.removeprefix("counter_"))
    return found


@pytest.mark.slow
def test_two_web_processes_share_one_quota(keyed: Settings, keys_file: Path) -> None:
    burst = 5
    keys_file.write_text(f"{ALICE} name=alice rate=1/h burst={burst}\n")
    web, base = start_web(keyed, "--web-workers", "2", "--api-keys", str(keys_file))
    statuses: list[int] = []
    remaining: list[str] = []

    def one(path: str) -> None:
        # A connection of its own each time, so either process may take it.
        # One image each, with a deadline of a millisecond: no worker serves
        # this queue, so an admitted image is a 504 at once.
        with requests.Session() as session:
            if path == "/predict":
                answer = session.post(
                    base + path, files={"image": ("x.png", CHELSEA)}, timeout=30,
                    headers={"X-API-Key": ALICE, "X-Request-Timeout": "0.001"},
                )  # fmt: skip
            else:
                answer = session.post(
                    base + path, data=infer_json(CHELSEA, parameters={"timeout": 1000}),
                    headers={"X-API-Key": ALICE, "Content-Type": "application/json"}, timeout=30,
                )  # fmt: skip
        statuses.append(answer.status_code)
        if answer.status_code == 504:
            remaining.append(answer.headers["RateLimit-Remaining"])
        else:
            assert answer.status_code == 429, answer.text
            shape = {"error"} if path.startswith("/v2") else {"success", "error"}
            assert set(answer.json()) == shape

    def both_answered() -> bool:
        list(pool.map(one, ["/predict", INFER] * 4))
        return len(counting_processes(web.pid)) == 2

    try:
        # Rounds of requests until both processes have counted one: how the
        # kernel spreads connections over them is not ours to rely on.
        with ThreadPoolExecutor(8) as pool:
            wait_until(both_answered, timeout=240, what="both web processes answering")
    finally:
        log = stop(web)
    # Each process alone would have let `burst` through.
    assert statuses.count(504) == burst, log
    assert sorted(remaining) == [str(n) for n in range(burst)]
    assert statuses.count(429) == len(statuses) - burst
    assert ALICE not in log


def test_key_names_stay_out_of_metrics_unless_asked(keyed: Settings, model: None) -> None:
    """A scrape lists the server's clients only with --metrics-key-names:
    without it, every key is counted under one name, '-'."""
    quiet = create_app(dataclasses.replace(keyed, metrics_key_names=False)).test_client()
    before = metric(quiet, "alice", "within"), metric(quiet, "-", "within")
    assert post_images(quiet, CHELSEA, headers={"X-API-Key": ALICE}).status_code == 200
    after = metric(quiet, "alice", "within"), metric(quiet, "-", "within")
    # (Counters are the process's: other tests' counts are in them, unchanged.)
    assert (after[0] - before[0], after[1] - before[1]) == (0, 1)
