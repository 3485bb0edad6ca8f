"""The files of a multipart/form-data request body, read with python-multipart:
whole for /predict (`request_files`), streamed for POST /jobs (`read_job_body`).

werkzeug's form parser costs about 0.7 ms of CPU for a 235 KB upload and
6 ms for a 4 MB photo (it compiles a regular expression for every request's
boundary and scans in Python); python-multipart, the parser Starlette uses,
takes about a tenth of that. Only parts that carry a filename count as files
(a plain form field named `image` is not an upload), exactly as
`request.files` would say. A /predict body stays in memory (it is capped
by MAX_CONTENT_LENGTH, --max-upload-mb, and never lands on disk).

python-multipart is strict where werkzeug is lenient (werkzeug's own test
client writes an empty file part with no line break before the closing
boundary): a /predict body it cannot parse is left to werkzeug, which then
decides; a job's body, read once as it streams, is refused (400).

A job's body may be up to --max-job-upload-mb (256 MB), so it is never held
whole: `read_job_body` reads it from the WSGI input a chunk at a time, feeds
python-multipart, and writes the image parts to one spooled temporary file
and the archive part to another (SPOOL_MEMORY in memory each, then on disk).
Each image part may be up to --max-upload-mb, as on /predict; the plain
fields it is asked for up to MAX_FIELD_BYTES; other parts are counted and
dropped. Anything over is refused (`UploadRefused`) as soon as it is seen.
Memory per job body: the two spools' SPOOL_MEMORY and one READ_CHUNK.

What a route left unread of a body (a 404 before the upload was looked at)
is read and dropped after it answers (`finish_body`), so that a kept-alive
connection stays usable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Collection, Iterator
from types import TracebackType
from typing import IO, NamedTuple

from flask import Response, request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header


class Upload(NamedTuple):
    """One file part: the name the client gave it, and its bytes."""

    filename: str
    data: bytes


def read_files(
    body: bytes, content_type: str | None, fields: dict[str, str] | None = None
) -> dict[str, list[Upload]] | None:
    """Each file field's contents, by field name, in body order: an empty dict
    when the body is not multipart/form-data, None when it claims to be but
    python-multipart cannot parse it. `fields`, when given, also gets the
    first value of each plain (non-file) field, as text, in the same pass."""
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data":
        return {}
    if not boundary:
        return None
    files: dict[str, list[Upload]] = {}
    part = _WholePart(files, fields)
    try:
        parser = MultipartParser(boundary, part.callbacks())
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError):
        return None
    return files if part.complete else None


class _Part:
    """The part being parsed, fed by python-multipart's callbacks (the on_*
    methods): its headers, then its data, which a subclass keeps or drops."""

    def __init__(self) -> None:
        self.header_field = b""
        self.header_value = b""
        self.disposition = b""
        self.complete = False

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {name: getattr(self, name) for name in dir(self) if name.startswith("on_")}

    def on_part_begin(self) -> None:
        self.disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]
        self._check_header()

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        self._check_header()

    def _check_header(self) -> None:
        """Nothing: a /predict body is capped whole (MAX_CONTENT_LENGTH)."""

    def on_header_end(self) -> None:
        if self.header_field.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_end(self) -> None:
        self.complete = True

    def named(self) -> tuple[str, str | None] | None:
        """(field name, filename; None for a plain field) of a form-data part,
        by its Content-Disposition; None for any other part."""
        kind, options = parse_options_header(self.disposition)
        name = options.get(b"name")
        if kind != b"form-data" or name is None:
            return None
        filename = options.get(b"filename")
        decoded = None if filename is None else filename.decode("utf-8", "replace")
        return name.decode("utf-8", "replace"), decoded


class _WholePart(_Part):
    """A /predict body's parts, held whole: each file by field name, and the
    first value of each plain field into `fields` (when given)."""

    def __init__(self, files: dict[str, list[Upload]], fields: dict[str, str] | None) -> None:
        super().__init__()
        self.files = files
        self.fields = fields
        self.chunks: list[bytes] = []

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self.chunks = []

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        named, data = self.named(), b"".join(self.chunks)
        self.chunks = []
        if named is None:
            return
        field, filename = named
        if filename is not None:
            self.files.setdefault(field, []).append(Upload(filename, data))
        elif self.fields is not None:
            self.fields.setdefault(field, data.decode("utf-8", "replace"))


def request_files(fields: dict[str, str] | None = None) -> dict[str, list[Upload]]:
    """The current Flask request's uploaded files by field name; `fields`,
    when given, gets its plain fields too (read_files)."""
    # Cached, so that werkzeug can parse what python-multipart cannot.
    files = read_files(request.get_data(cache=True), request.content_type, fields)
    if files is None:
        if fields is not None:
            fields.update({name: request.form[name] for name in request.form})
        files = {
            name: [Upload(f.filename or "", f.read()) for f in request.files.getlist(name)]
            for name in request.files
        }
    return files


# A spool stays in memory up to this, then moves to a temporary file.
SPOOL_MEMORY = 1 << 20
# Bytes read from the request body at a time.
READ_CHUNK = 64 * 1024
# A plain field (a model name, a callback URL) and a part's headers are short.
MAX_FIELD_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024


class UploadRefused(Exception):
    """A job's body is refused: `status` (400 or 413) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def finish_body(response: Response, limit: int) -> Response:
    """`response` once the rest of the request's body, which the route did
    not read (a 404 or 401 sent before the upload was looked at, a job
    refused part way), is read and dropped, up to `limit` bytes; past that,
    the response says `Connection: close`.

    The front (granian) closes a kept-alive connection whose request body
    was left unread, but does not always say so: a client that sends its
    next request on it loses that request (seen with 60-500 KB uploads
    answered 404). A client still sending the body may also miss the answer
    when the connection closes under it. Draining costs the body's transfer,
    which the client has committed to sending anyway."""
    environ = request.environ
    declared = request.content_length
    if not declared and "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return response  # no body
    if declared is not None and declared > limit:
        response.headers["Connection"] = "close"
        return response
    stream = environ["wsgi.input"]  # what werkzeug's wrappers have read is gone from it
    left = limit
    while chunk := stream.read(min(READ_CHUNK, left + 1)):
        left -= len(chunk)
        if left < 0:
            response.headers["Connection"] = "close"
            break
    return response


def job_too_large(max_body: int) -> UploadRefused:
    return UploadRefused(
        413, f"the job is larger than the {max_body / 2**20:g} MB limit (--max-job-upload-mb)"
    )


class SpooledImage(NamedTuple):
    """An image part: its filename, and where its bytes are in the spool."""

    filename: str
    offset: int
    size: int


class JobBody:
    """A POST /jobs body, read: the image parts (`images`, their bytes in
    one spool), the archive part (`archive`, a spool of its own, or None)
    and the plain fields asked for. Close it to free the spools."""

    def __init__(self) -> None:
        self.images: list[SpooledImage] = []
        self.archive: IO[bytes] | None = None
        self.archive_name = ""
        self.fields: dict[str, str] = {}
        self.spool: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_MEMORY)  # noqa: SIM115

    def image_files(self) -> Iterator[tuple[str, bytes]]:
        """(filename, bytes) of each image part, in body order, one at a time."""
        for image in self.images:
            self.spool.seek(image.offset)
            yield image.filename, self.spool.read(image.size)

    def close(self) -> None:
        self.spool.close()
        if self.archive is not None:
            self.archive.close()

    def __enter__(self) -> JobBody:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_job_body(
    stream: IO[bytes],
    content_type: str | None,
    content_length: int | None,
    *,
    max_body: int,
    max_image: int,
    fields: Collection[str],
) -> JobBody:
    """The parts of a POST /jobs body read from `stream`: `image` file parts
    of at most `max_image` bytes each, one `archive` file part, and the
    plain `fields` named; at most `max_body` bytes in all, refused from
    `content_length` when it says so. A body that is not multipart/form-data
    has no parts. UploadRefused (400 or 413) for anything else, and the
    spools are then closed."""
    if content_length is not None and content_length > max_body:
        raise job_too_large(max_body)
    body = JobBody()
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        return body
    boundary = options.get(b"boundary")
    try:
        if not boundary:
            raise UploadRefused(400, "the multipart/form-data body has no boundary")
        part = _JobPart(body, max_image, fields)
        parser = MultipartParser(boundary, part.callbacks())
        read = 0
        while chunk := stream.read(READ_CHUNK):
            read += len(chunk)
            if read > max_body:
                raise job_too_large(max_body)
            parser.write(chunk)
        parser.finalize()
        if not part.complete:
            raise UploadRefused(400, "the multipart/form-data body ends before its last part")
    except (MultipartParseError, ValueError) as exc:
        body.close()
        raise UploadRefused(400, f"the multipart/form-data body cannot be read ({exc})") from None
    except BaseException:
        body.close()
        raise
    return body


class _JobPart(_Part):
    """The part of a job's body being read: where its data goes is chosen
    once its headers are read."""

    def __init__(self, body: JobBody, max_image: int, fields: Collection[str]) -> None:
        super().__init__()
        self.body = body
        self.max_image = max_image
        self.wanted = fields
        self.write: Callable[[bytes], object] = _drop
        self.finish: Callable[[], None] = _nothing

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self.write, self.finish = _drop, _nothing

    def _check_header(self) -> None:
        if len(self.header_field) + len(self.header_value) > MAX_HEADER_BYTES:
            raise UploadRefused(400, f"a part's header is longer than {MAX_HEADER_BYTES} bytes")

    def on_headers_finished(self) -> None:
        """Where this part's data goes, by its Content-Disposition."""
        named = self.named()
        if named is None:
            return
        field, filename = named
        if filename is None:
            if field in self.wanted:
                self._field(field)
        elif field == "image":
            self._image(filename)
        elif field == "archive":
            self._archive(filename)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.write(data[start:end])

    def on_part_end(self) -> None:
        self.finish()

    def _image(self, filename: str) -> None:
        spool, offset = self.body.spool, self.body.spool.seek(0, 2)
        size = 0

        def write(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > self.max_image:
                raise UploadRefused(
                    413,
                    f"image {filename!r} is larger than the {self.max_image / 2**20:g} MB "
                    "limit (--max-upload-mb)",
                )
            spool.write(data)

        self.write = write
        self.finish = lambda: self.body.images.append(SpooledImage(filename, offset, size))

    def _archive(self, filename: str) -> None:
        if self.body.archive is not None:
            raise UploadRefused(400, "one 'archive' field at most")
        self.body.archive = tempfile.SpooledTemporaryFile(SPOOL_MEMORY)  # noqa: SIM115
        self.body.archive_name = filename
        self.write = self.body.archive.write

    def _field(self, field: str) -> None:
        chunks: list[bytes] = []
        size = 0

        def write(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_FIELD_BYTES:
                raise UploadRefused(
                    413, f"the form field {field!r} is longer than {MAX_FIELD_BYTES} bytes"
                )
            chunks.append(data)

        def finish() -> None:
            self.body.fields.setdefault(field, b"".join(chunks).decode("utf-8", "replace"))

        self.write, self.finish = write, finish


def _drop(data: bytes) -> None:
    """A part nobody reads: counted in the body's size, and dropped."""


def _nothing() -> None:
    pass
