"""Why the model said what it said: a heat map of the parts of an image its
answer rests on, whatever the transport (`/explain`, v2's
`parameters.explain`, gRPC) and, for occlusion, whatever the engine.

Two methods:

- `occlusion` (the default; any engine): the image is decoded once, within
  the process's decode budget, then shown to the model again with one cell
  of a grid (`--explain-grid` N: N x N cells, or the request's `grid`)
  painted a neutral grey at a time. A cell's importance is how much that
  lowers the probability of the class being explained (the most likely, or
  the one asked for), clipped at 0 and divided by the largest drop, so the
  map is in [0, 1] (`max_drop` says what 1 stands for; a map of zeros: no
  cell lowered it). The cells do not overlap: each is masked alone, all of
  equal size (overlapping patches smooth the map, but those at the edges
  are clipped smaller, which biases it toward the centre). The masked
  copies are ordinary queue entries at the model's input size (`Image(
  pixels=...)`, the probabilities form): they go through the same pipeline,
  queue and batches as every request, at the LOWEST priority level, so an
  explanation never delays a request of a higher level by more than the
  batch it shares.
- `gradcam` (the keras engine only): one queue entry whose header asks the
  worker for Grad-CAM from the model's last convolutional layer
  (engines/keras_engine.py; broker/messages.py's `explain` field); the
  grid is that layer's. Refused with a 400 naming the engines that compute
  it when the model's live workers run another (their heartbeats say which).

An explanation's images count against the caller's quota as the images they
are, charged at once before any is queued (over quota: refused whole). They
skip the response cache: a masked copy is an image nobody sends, so looking
it up would cost a Redis round trip per cell for no hit, and storing it would
fill the cache with N x N answers per explanation, evicting the answers to
real uploads. The explained image itself is asked for alongside, as the
probabilities it has (the map's baseline), uncached for the same reason (its
form differs from `/predict`'s, so `/predict`'s entry would not serve it).

`overlay_png` draws the map over the image at the model's input size, in
the same colours as the upload page. TensorFlow-free.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage

from keras_server.broker import messages
from keras_server.serving.admission import Urgency
from keras_server.serving.failures import BadInput, Bug, Failure, no_live_worker
from keras_server.serving.models import ServedModel
from keras_server.serving.pipeline import Form, Image, Pipeline, read_probabilities
from keras_server.serving.quotas import Caller
from keras_server.serving.traffic import Route
from keras_server.settings import MAX_EXPLAIN_GRID as MAX_GRID
from keras_server.settings import MIN_EXPLAIN_GRID as MIN_GRID

log = logging.getLogger(__name__)

OCCLUSION, GRADCAM = "occlusion", "gradcam"
METHODS = (OCCLUSION, GRADCAM)
# The engines whose workers compute Grad-CAM (engines/keras_engine.py).
GRADCAM_ENGINES = ("keras",)
# A masked cell's colour: mid-grey, about the mean pixel every preprocessing
# centres on, so a mask removes what is there rather than adding an edge.
GREY = 127
# The heat map's colours, low to high (a short turbo-like ramp); the upload
# page's legend and canvas use the same (web/assets/app.js).
RAMP = np.array(
    [(48, 18, 59), (70, 134, 251), (27, 229, 181), (250, 186, 57), (122, 4, 3)], dtype=np.float32
)
OPACITY = 0.5


@dataclass(frozen=True)
class Ask:
    """What to explain: the method, the class (None: the most likely; an
    index, or a label), and occlusion's grid (N x N)."""

    method: str = OCCLUSION
    target: int | str | None = None
    grid: int = 8


@dataclass
class Explanation:
    """An image explained: its probabilities and top classes (the baseline),
    the class explained, and the heat map (rows x columns, 0..1)."""

    method: str
    probabilities: np.ndarray
    classes: list[dict[str, Any]]  # the most likely classes, {"index", "label"}
    index: int
    label: str
    heatmap: np.ndarray
    images: int  # how many images the model was shown for it
    pixels: np.ndarray  # the image at the model's input size
    model: dict[str, str]  # {"name", "version"} of the worker that answered
    max_drop: float | None = None  # occlusion: the drop in probability 1.0 stands for

    def predictions(self, k: int) -> list[dict[str, Any]]:
        """The top `k` classes in /predict's shape."""
        return [
            {"label": c["label"], "probability": float(self.probabilities[c["index"]])}
            for c in self.classes[:k]
        ]

    def as_dict(self) -> dict[str, Any]:
        """The explanation's JSON (without the predictions)."""
        rows, columns = self.heatmap.shape
        body: dict[str, Any] = {
            "method": self.method,
            "class": {"index": self.index, "label": self.label},
            "probability": float(self.probabilities[self.index]),
            "rows": rows,
            "columns": columns,
            "heatmap": np.round(self.heatmap.astype(np.float64), 4).tolist(),
            "images": self.images,
        }
        if self.max_drop is not None:
            body["max_drop"] = round(self.max_drop, 6)
        return body


# -- reading a request ----------------------------------------------------------


def method_of(value: object) -> str:
    """A request's method (None, "": occlusion); BadInput naming the methods."""
    if value is None or value == "":
        return OCCLUSION
    if value not in METHODS:
        raise BadInput(f"unknown explanation method {value!r}; use one of {', '.join(METHODS)}")
    return str(value)


def grid_of(value: object, default: int) -> int:
    """A request's grid (None: `default`, --explain-grid); BadInput naming the range."""
    if value is None or value == "":
        return default
    number = _whole(value)
    if number is None or not MIN_GRID <= number <= MAX_GRID:
        raise BadInput(
            f"grid must be a whole number from {MIN_GRID} to {MAX_GRID} (N x N cells; "
            f"--explain-grid is the default), not {value!r}"
        )
    return number


def target_of(value: object) -> int | str | None:
    """`class=`: a class index (digits), a label, or nothing (the top class)."""
    if value is None or value == "":
        return None
    number = _whole(value)
    if number is not None:
        return number
    if not isinstance(value, str):
        raise BadInput(f"class must be a class index or a label, not {value!r}")
    return value.strip()


def _whole(value: object) -> int | None:
    """A whole number 0 or more, given as one or as digits; None otherwise.
    Past nine digits it is 10**9: out of every range here (and Python's
    int() refuses strings of over 4,300 digits)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    text = value.strip() if isinstance(value, str) else ""
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text) <= 9 else 10**9


# -- explaining -----------------------------------------------------------------


def explain(
    pipeline: Pipeline,
    target: tuple[ServedModel, Route],
    image: Image,
    ask: Ask,
    timeout: float,
    *,
    classes: int = 0,
    caller: Caller | None = None,
) -> Explanation:
    """`image` explained by the model and route `target` (Pipeline.target;
    see the module's docstring) within `timeout` seconds, at the lowest
    priority level; `classes`: how many of the most likely classes to name
    (at least the model's top_k)."""
    model, _ = target
    run = _Run(pipeline, target, time.monotonic() + timeout)
    workers = model.live_workers()
    size = model.input_size(workers)
    if size is None:
        raise no_live_worker(model.name)
    if ask.method == GRADCAM:
        engines = sorted({w.engine for w in workers if w.engine})
        if not engines:
            # Which engine will answer is not known until a worker beats.
            raise no_live_worker(model.name)
        if not any(e in GRADCAM_ENGINES for e in engines):
            raise BadInput(
                f"method=gradcam needs the {' or '.join(GRADCAM_ENGINES)} engine; model "
                f"{model.name!r} runs on {', '.join(engines)}: use method=occlusion (any engine)"
            )
    known = max((w.labels for w in workers), default=0)
    if isinstance(ask.target, int) and known and ask.target >= known:
        raise BadInput(messages.out_of_range(ask.target, known))
    pixels = pipeline.pixels(image, size)
    named = max(classes, model.spec.top_k, 1)
    # A label is looked up among every class's: the baseline names them all.
    if isinstance(ask.target, str):
        named = max(named, known or messages.MAX_CLASSES)
    cells = ask.grid * ask.grid if ask.method == OCCLUSION else 0
    # Grad-CAM of a label: the baseline finds its index, a second image explains it.
    images = 1 + cells + (ask.method == GRADCAM and isinstance(ask.target, str))
    if caller is not None and pipeline.limiter is not None:
        pipeline.limiter.charge(caller, images)
    if ask.method == GRADCAM:
        if isinstance(ask.target, str):  # a label: its index, from the baseline
            index = _index(ask.target, *run.one(pixels, Form(True, named)))
        else:
            index = -1 if ask.target is None else ask.target
        form = Form(True, named, explain=GRADCAM, explain_class=index)
        found = _from_worker(*run.one(pixels, form), pixels, named)
        found.images = images
        return found
    header, vector = run.one(pixels, Form(True, named))
    index = _index(ask.target, header, vector)
    answers = run.answers(masked(pixels, ask.grid), Form(True, 0))
    drops = [vector[index] - read_probabilities(raw)[1][index] for raw in answers]
    heatmap, drop = importance(np.array(drops, dtype=np.float64).reshape(ask.grid, ask.grid))
    return Explanation(
        OCCLUSION,
        vector,
        header.get("classes", [])[:named],
        index,
        _label(header, index),
        heatmap,
        images,
        pixels,
        header.get("model") or {},
        drop,
    )


@dataclass(frozen=True)
class _Run:
    """One explanation's images through the pipeline: by one model and
    route, at the lowest level, uncached and already charged, by one
    deadline (monotonic)."""

    pipeline: Pipeline
    target: tuple[ServedModel, Route]
    deadline: float

    def answers(self, images: Sequence[np.ndarray], form: Form) -> list[bytes]:
        """The worker's answers to `images`; the first image's failure is
        the explanation's."""
        settings = self.pipeline.settings
        urgency = Urgency.lowest(settings, max(self.deadline - time.monotonic(), 0.0))
        model, route = self.target
        pixels = [Image(pixels=p) for p in images]
        answered = self.pipeline.run(model, route, pixels, form, urgency, cached=False)
        for answer in answered.answers:
            if isinstance(answer, Failure):
                raise answer
        return answered.answers  # type: ignore[return-value]

    def one(self, pixels: np.ndarray, form: Form) -> tuple[dict[str, Any], np.ndarray]:
        (raw,) = self.answers([pixels], form)
        return read_probabilities(raw)


def _index(target: int | str | None, header: dict[str, Any], vector: np.ndarray) -> int:
    """The class to explain: the most likely, or the one named (checked)."""
    if target is None:
        return int(np.argmax(vector))
    if isinstance(target, int):
        if target >= len(vector):
            raise BadInput(messages.out_of_range(target, len(vector)))
        return target
    for named in header.get("classes", []):
        if named.get("label") == target:
            return int(named["index"])
    raise BadInput(
        f"unknown class {target!r}: name a label of the model's (GET /models says how many "
        f"classes it has), or a class index 0..{len(vector) - 1}"
    )


def _label(header: dict[str, Any], index: int) -> str:
    for named in header.get("classes", []):
        if named.get("index") == index:
            return str(named.get("label", ""))
    return ""


def _from_worker(
    header: dict[str, Any], vector: np.ndarray, pixels: np.ndarray, named: int
) -> Explanation:
    """A Grad-CAM answer: the worker's heat map and the class it explained."""
    try:
        heatmap = np.asarray(header["heatmap"], dtype=np.float32)
        explained = header["explained"]
        index, label = int(explained["index"]), str(explained["label"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Bug(f"a worker's heat map cannot be read ({exc!r})") from None
    if heatmap.ndim != 2 or not heatmap.size:
        raise Bug(f"a worker's heat map has shape {heatmap.shape}")
    return Explanation(
        GRADCAM,
        vector,
        header.get("classes", [])[:named],
        index,
        label,
        heatmap,
        1,
        pixels,
        header.get("model") or {},
    )


def cells(height: int, width: int, grid: int) -> list[tuple[slice, slice]]:
    """The grid's cells, row by row: equal up to a pixel, covering the image."""
    rows = np.linspace(0, height, grid + 1).round().astype(int)
    columns = np.linspace(0, width, grid + 1).round().astype(int)
    return [
        (slice(rows[r], rows[r + 1]), slice(columns[c], columns[c + 1]))
        for r in range(grid)
        for c in range(grid)
    ]


def masked(pixels: np.ndarray, grid: int) -> list[np.ndarray]:
    """One copy of `pixels` per cell, that cell painted GREY."""
    copies = []
    for rows, columns in cells(pixels.shape[0], pixels.shape[1], grid):
        copy = pixels.copy()
        copy[rows, columns] = GREY
        copies.append(copy)
    return copies


def importance(drops: np.ndarray) -> tuple[np.ndarray, float]:
    """Drops in probability as importances in [0, 1] (a rise counts as 0),
    and the drop that 1 stands for."""
    clipped = np.clip(drops, 0.0, None)
    top = float(clipped.max()) if clipped.size else 0.0
    # Below float32's resolution of a probability, a drop is noise.
    if top <= 1e-6:
        return np.zeros_like(clipped, dtype=np.float32), 0.0
    return (clipped / top).astype(np.float32), top


# -- drawing --------------------------------------------------------------------


def colours(heatmap: np.ndarray) -> np.ndarray:
    """Each importance (0..1) as an RGB colour of RAMP, float32 (..., 3)."""
    position = np.clip(heatmap, 0.0, 1.0) * (len(RAMP) - 1)
    low = np.minimum(position.astype(int), len(RAMP) - 2)
    share = (position - low)[..., np.newaxis]
    return RAMP[low] * (1 - share) + RAMP[low + 1] * share


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray, opacity: float = OPACITY) -> bytes:
    """The heat map, smoothed to the image's size, over the image (the
    model's input size): a PNG."""
    height, width = pixels.shape[:2]
    grid = PILImage.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    smooth = np.asarray(grid.resize((width, height), PILImage.Resampling.BILINEAR))
    base = np.clip(np.asarray(pixels, dtype=np.float32), 0, 255)
    if base.ndim == 2:
        base = np.repeat(base[..., np.newaxis], 3, axis=-1)
    blended = base[..., :3] * (1 - opacity) + colours(smooth) * opacity
    buffer = io.BytesIO()
    PILImage.fromarray(blended.round().astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
