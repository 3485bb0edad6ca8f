"""Which models a deployment serves: model specs, the built-in catalogue, label files.

A spec names a model and where it comes from: a `keras.applications` network
by name (each with its own input size and Keras's own preprocessing), `sim`
(the load-testing stand-in), or a saved `.keras` file with a labels file.
Several specs come from a TOML models file (`--models-file`); without one the
deployment serves the single model the flags describe (`model_specs`).
TensorFlow-free: the web tier reads this too.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from keras_server.labels import imagenet_labels

PREPROCESSING = ("caffe", "tf", "torch", "none", "scale")
# --weights values that name weights rather than a file; any case.
WEIGHT_NAMES = ("imagenet", "none")
MAX_TOP_K = 1000
ENGINES = ("auto", "keras", "onnx", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Builtin:
    constructor: str  # attribute of keras.applications
    module: str  # keras.applications.<module>.preprocess_input
    size: int  # input width = height


BUILTINS: dict[str, Builtin] = {
    "resnet50": Builtin("ResNet50", "resnet50", 224),
    "resnet101": Builtin("ResNet101", "resnet", 224),
    "resnet152": Builtin("ResNet152", "resnet", 224),
    "resnet50_v2": Builtin("ResNet50V2", "resnet_v2", 224),
    "vgg16": Builtin("VGG16", "vgg16", 224),
    "vgg19": Builtin("VGG19", "vgg19", 224),
    "mobilenet": Builtin("MobileNet", "mobilenet", 224),
    "mobilenet_v2": Builtin("MobileNetV2", "mobilenet_v2", 224),
    "mobilenet_v3_small": Builtin("MobileNetV3Small", "mobilenet_v3", 224),
    "mobilenet_v3_large": Builtin("MobileNetV3Large", "mobilenet_v3", 224),
    "efficientnet_b0": Builtin("EfficientNetB0", "efficientnet", 224),
    "efficientnet_b1": Builtin("EfficientNetB1", "efficientnet", 240),
    "efficientnet_b2": Builtin("EfficientNetB2", "efficientnet", 260),
    "efficientnet_b3": Builtin("EfficientNetB3", "efficientnet", 300),
    "efficientnet_v2_b0": Builtin("EfficientNetV2B0", "efficientnet_v2", 224),
    "densenet121": Builtin("DenseNet121", "densenet", 224),
    "inception_v3": Builtin("InceptionV3", "inception_v3", 299),
    "xception": Builtin("Xception", "xception", 299),
    "convnext_tiny": Builtin("ConvNeXtTiny", "convnext", 224),
}
SIM = "sim"
SIM_SIZE = 224


class CatalogError(ValueError):
    """A model spec or labels file we cannot use; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # a BUILTINS name, "sim", or the path of a .keras file
    weights: str = "imagenet"  # builtins: imagenet, none, or a .weights.h5 path
    labels: str | None = None  # a labels file; ImageNet's for builtins
    preprocessing: str | None = None  # None: the builtin's own; "none" for files
    top_k: int = 5
    # Said in every answer and heartbeat, so a rolling upgrade shows which
    # version served each request.
    version: str = "1"
    # What runs it (engines/choice.py); None: the --engine / --precision /
    # --calibration-dir flags' (model_specs fills them in).
    engine: str | None = None
    precision: str | None = None
    calibration_dir: str | None = None
    # Seconds an answer stays in the response cache (serving/cache.py);
    # 0: not cached. None: --response-cache-ttl's (model_specs fills it in).
    response_cache_ttl: float | None = None
    # The layer Grad-CAM explains from (method=gradcam, keras engine); None:
    # the last layer with a 4-D (image-like) output.
    gradcam_layer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", weights_name(self.weights))

    @property
    def builtin(self) -> Builtin | None:
        return BUILTINS.get(self.source)

    @property
    def is_file(self) -> bool:
        return self.source not in BUILTINS and self.source != SIM

    @property
    def static_size(self) -> tuple[int, int] | None:
        """(width, height) known without loading the model, if any."""
        if self.builtin:
            return (self.builtin.size, self.builtin.size)
        return (SIM_SIZE, SIM_SIZE) if self.source == SIM else None

    def validate(self) -> ModelSpec:
        if not NAME.match(self.name):
            raise CatalogError(
                f"model name {self.name!r}: use 1-64 lower-case letters, digits, '_' or '-'"
            )
        try:
            check_source(self.source)
        except CatalogError as exc:
            raise CatalogError(f"model {self.name!r}: {self.source!r} {exc}") from None
        if not VERSION.match(self.version):
            raise CatalogError(
                f"model {self.name!r}: version {self.version!r}: use 1-64 letters, digits, "
                "'.', '_' or '-'"
            )
        try:
            check_top_k(self.top_k)
        except CatalogError as exc:
            raise CatalogError(f"model {self.name!r}: top_k {exc}") from None
        for field, value, options in (
            ("preprocessing", self.preprocessing, PREPROCESSING),
            ("engine", self.engine, ENGINES),
            ("precision", self.precision, PRECISIONS),
        ):
            if value is not None and value not in options:
                raise CatalogError(
                    f"model {self.name!r}: {field} {value!r} is not one of {', '.join(options)}"
                )
        if self.response_cache_ttl is not None:
            try:
                check_cache_ttl(self.response_cache_ttl)
            except CatalogError as exc:
                raise CatalogError(f"model {self.name!r}: response_cache_ttl {exc}") from None
        if self.engine in ("keras", "onnx") and self.precision not in (None, "fp32"):
            raise CatalogError(
                f"model {self.name!r}: precision {self.precision} runs only on the openvino "
                f"engine (or auto), not {self.engine}"
            )
        return self


def weights_name(value: str) -> str:
    """'imagenet' or 'none' in any case is that name, lower-cased; anything
    else is a path, kept as it is."""
    return value.lower() if value.lower() in WEIGHT_NAMES else value


def check_source(value: str) -> str:
    """Where a model comes from: a built-in name, sim, or a .keras file."""
    if value in BUILTINS or value == SIM or value.endswith(".keras"):
        return value
    raise CatalogError(f"must be sim, a .keras file or one of {', '.join(sorted(BUILTINS))}")


def check_top_k(value: object) -> int:
    """How many classes an answer lists: a whole number, 1 to MAX_TOP_K."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogError("must be a whole number")
    if not 1 <= value <= MAX_TOP_K:
        raise CatalogError(f"must be between 1 and {MAX_TOP_K}")
    return value


def check_cache_ttl(value: object) -> float:
    """Seconds a cached answer lives: a number, 0 (not cached) or more."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CatalogError("must be a number of seconds")
    if not 0 <= value < float("inf"):
        raise CatalogError("must be 0 (off) or more seconds")
    return float(value)


class Models(NamedTuple):
    """The models a deployment serves and the default one's name: resolved once
    by the entry point (`model_specs`) and passed down."""

    specs: tuple[ModelSpec, ...]
    default: str

    def find(self, name: str) -> ModelSpec | None:
        return next((s for s in self.specs if s.name == name), None)

    def serving(self, serve: str) -> tuple[ModelSpec, ...]:
        """The models a worker loads for `--serve`: "all", or names separated by commas."""
        if serve == "all":
            return self.specs
        chosen = []
        for name in (n.strip() for n in serve.split(",")):
            spec = self.find(name)
            if spec is None:
                known = ", ".join(s.name for s in self.specs)
                raise CatalogError(f"--serve {name}: no such model (known: {known})")
            chosen.append(spec)
        return tuple(chosen)


class ModelFlags(Protocol):
    """The settings `model_specs` reads (settings.Settings has them)."""

    models_file: str
    model: str
    weights: str
    labels: str
    preprocessing: str
    top_k: int
    model_version: str
    engine: str
    precision: str
    calibration_dir: str
    response_cache_ttl: float


def model_specs(flags: ModelFlags) -> Models:
    """The models a deployment serves, and the default one's name: those of
    --models-file, else the one the flags describe. Read once by the entry
    point, which passes them down.

    Raises CatalogError when the models file or a spec is unusable.
    """
    if flags.models_file:
        specs, default = load_models_file(flags.models_file)
        # A model that names no engine, precision or calibration set gets the flags'.
        return Models(tuple(_flag_defaults(s, flags) for s in specs), default)
    source = flags.model
    name = Path(source).stem.lower() if source.endswith(".keras") else source
    name = re.sub(r"[^a-z0-9_-]+", "-", name).strip("-_") or "model"
    spec = ModelSpec(
        name=name,
        source=source,
        weights=flags.weights,
        labels=flags.labels or None,
        preprocessing=flags.preprocessing or None,
        top_k=flags.top_k,
        version=flags.model_version,
    )
    return Models((_flag_defaults(spec, flags),), name)


def _flag_defaults(spec: ModelSpec, flags: ModelFlags) -> ModelSpec:
    ttl = spec.response_cache_ttl
    return dataclasses.replace(
        spec,
        engine=spec.engine or flags.engine,
        precision=spec.precision or flags.precision,
        calibration_dir=spec.calibration_dir or flags.calibration_dir or None,
        response_cache_ttl=flags.response_cache_ttl if ttl is None else ttl,
    ).validate()


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Class names from a file: one per line, a JSON list, or a JSON object
    keyed by class index (Keras's imagenet_class_index.json style included)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"labels file {path}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CatalogError(f"labels file {path}: not valid JSON ({exc})") from None
        if isinstance(data, list):
            labels = [str(x) for x in data]
        elif isinstance(data, dict):
            try:
                ordered = sorted(data.items(), key=lambda kv: int(kv[0]))
            except ValueError:
                raise CatalogError(f"labels file {path}: keys must be class indices") from None
            if [int(k) for k, _ in ordered] != list(range(len(ordered))):
                raise CatalogError(f"labels file {path}: class indices must be 0..n-1")
            labels = [str(v[-1] if isinstance(v, list) else v) for _, v in ordered]
        else:
            raise CatalogError(f"labels file {path}: expected a JSON list or object")
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise CatalogError(f"labels file {path}: no labels in it")
    return tuple(labels)


def labels_for(spec: ModelSpec) -> tuple[str, ...]:
    if spec.labels:
        return read_labels(spec.labels)
    return imagenet_labels()


def load_models_file(path: str | Path) -> Models:
    """The specs in a TOML models file, and the name of the default model.

        default = "resnet50"          # optional: else the first model
        [models.resnet50]
        model = "resnet50"            # a built-in name, "sim", or a .keras path
        weights = "imagenet"
        [models.shapes]
        model = "models/shapes.keras"
        labels = "models/shapes.txt"
        preprocessing = "scale"
        top_k = 2
        engine = "openvino"           # optional: else --engine, --precision,
        precision = "int8"            # --calibration-dir
        calibration_dir = "calibration/shapes"
        response_cache_ttl = 300      # optional: else --response-cache-ttl; 0: off
        gradcam_layer = "conv_last"   # optional: else the last layer with a 4-D output

    Relative paths are relative to the models file.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"models file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"models file {path}: {exc}") from None
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise CatalogError(f"models file {path}: no [models.NAME] tables")
    known = {"model", "weights", "labels", "preprocessing", "top_k", "version"}
    known |= {"engine", "precision", "calibration_dir", "response_cache_ttl", "gradcam_layer"}
    specs = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise CatalogError(
                f"models file {path}: [models.{name}] must be a table (model = ..., ...)"
            )
        for key in sorted(known & set(table) - {"top_k", "version", "response_cache_ttl"}):
            if not isinstance(table[key], str):
                raise CatalogError(f"models file {path}: [models.{name}] {key!r} must be a string")
        unknown = set(table) - known
        if unknown or "model" not in table:
            raise CatalogError(
                f"models file {path}: [models.{name}] needs 'model' and may have "
                f"{', '.join(sorted(known - {'model'}))}"
                + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else "")
            )
        try:
            spec = ModelSpec(
                name=name,
                source=_relative(path, table["model"], (*BUILTINS, SIM)),
                weights=_relative(
                    path, weights_name(table.get("weights", "imagenet")), WEIGHT_NAMES
                ),
                labels=_relative(path, table["labels"]) if "labels" in table else None,
                preprocessing=table.get("preprocessing"),
                top_k=table.get("top_k", 5),
                version=str(table.get("version", "1")),
                engine=table.get("engine"),
                precision=table.get("precision"),
                calibration_dir=(
                    _relative(path, table["calibration_dir"])
                    if "calibration_dir" in table
                    else None
                ),
                response_cache_ttl=table.get("response_cache_ttl"),
                gradcam_layer=table.get("gradcam_layer"),
            )
            specs.append(spec.validate())
        except CatalogError as exc:
            raise CatalogError(f"models file {path}: {exc}") from None
    default = data.get("default", specs[0].name)
    if not isinstance(default, str) or default not in {s.name for s in specs}:
        raise CatalogError(f"models file {path}: default model {default!r} is not defined")
    return Models(tuple(specs), default)


def _relative(base: Path, value: str, names: Sequence[str] = ()) -> str:
    """Paths in a models file are relative to it; `names` stay as they are."""
    if "\0" in value:  # no file system takes one (Path.resolve raises ValueError)
        raise CatalogError(f"{value!r}: a path cannot hold a NUL character")
    if value in names or Path(value).is_absolute():
        return value
    return str((base.parent / value).resolve())
