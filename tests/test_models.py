"""Serve your own models: a small CNN trained here on synthetic images (bright
vs dark squares) and saved as .keras with its labels, served beside a built-in
keras.applications model; model specs, label files and load-time checks."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import output, start, stop, wait_for_http, wait_until
from PIL import Image

from examples.squares import squares, train
from keras_server.broker.redis_server import free_port
from keras_server.catalog import CatalogError, ModelSpec, load_models_file, model_specs, read_labels
from keras_server.engines.predictor import ModelLoadError, parallel_batches_for
from keras_server.settings import Settings, SettingsError, load_settings


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/squares.py's grey-scale CNN (32x32x1 -> dark/bright) and its labels."""
    return train(tmp_path_factory.mktemp("squares"))


@pytest.fixture
def two_models(shapes_model: Path, settings: Settings, tmp_path: Path) -> Iterator[str]:
    """One server process serving the trained CNN and MobileNetV2 side by side."""
    models = tmp_path / "models.toml"
    models.write_text(
        f"""
default = "shapes"

[models.shapes]
model = "{shapes_model}"
labels = "{shapes_model.with_suffix(".txt")}"
preprocessing = "scale"
top_k = 2

[models.mobilenet]
model = "mobilenet_v2"
weights = "none"
engine = "keras"
"""
    )
    port = free_port()
    process = start(
        "--models-file", str(models), "--batch-size", "4", "--port", str(port),
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/healthz", process, timeout=180)
        yield base
    finally:
        log = stop(process)
    assert process.returncode == 0, log


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_two_models_side_by_side_and_the_trained_one_is_right(two_models: str) -> None:
    base = two_models
    listed = wait_until(lambda: requests.get(base + "/models", timeout=5).json(), what="models")
    assert listed["default"] == "shapes"
    by_name = {m["name"]: m for m in listed["models"]}
    assert by_name["shapes"]["input_size"] == [32, 32]
    assert by_name["shapes"]["labels"] == 2
    # One worker process: its claim loops, as many as its engine runs batches at once.
    shapes_loops = parallel_batches_for(0, by_name["shapes"]["engine"])
    assert by_name["shapes"]["live_workers"] == shapes_loops
    assert by_name["mobilenet"]["input_size"] == [224, 224]
    assert by_name["mobilenet"]["labels"] == 1000
    assert "MobileNetV2, RANDOM weights" in by_name["mobilenet"]["description"]
    # Per model: keras as the models file says; the other by --engine auto's pick.
    assert (by_name["mobilenet"]["engine"], by_name["mobilenet"]["precision"]) == ("keras", "fp32")
    assert by_name["mobilenet"]["fidelity"] is None
    assert (by_name["shapes"]["engine"], by_name["shapes"]["precision"]) == ("openvino", "fp32")
    assert by_name["shapes"]["fidelity"]["max_probability_difference"] <= 1e-4

    # Held-out images, bigger than the model's input: the web tier resizes them.
    images, labels = squares(24, seed=99, size=64)
    names = ["dark", "bright"]
    for image, label in zip(images, labels, strict=True):
        answer = requests.post(
            base + "/models/shapes/predict", files={"image": ("x.png", png(image))}, timeout=30
        ).json()
        assert answer["success"] is True
        assert len(answer["predictions"]) == 2, "top_k = 2 for this model"
        assert answer["predictions"][0]["label"] == names[label]

    default = requests.post(
        base + "/predict", files={"image": ("x.png", png(images[0]))}, timeout=30
    )
    assert default.json()["predictions"][0]["label"] in names, "/predict serves the default"

    with open("images/chelsea.png", "rb") as f:
        other = requests.post(base + "/models/mobilenet/predict", files={"image": f}, timeout=60)
    assert other.status_code == 200
    assert len(other.json()["predictions"]) == 5

    unknown = requests.post(
        base + "/models/alexnet/predict", files={"image": ("x.png", b"x")}, timeout=5
    )
    assert unknown.status_code == 404
    assert "GET /models" in unknown.json()["error"]

    ready = requests.get(base + "/readyz", timeout=5).json()
    assert ready["ready"] is True
    # One model process serves both: one worker, its claim loops for each model
    # (one for mobilenet's keras engine).
    assert (ready["workers"], ready["claim_loops"]) == (1, shapes_loops + 1)


def load(spec: ModelSpec) -> object:
    from keras_server.engines.keras_engine import load_classifier

    return load_classifier(spec)


@pytest.mark.slow
def test_a_model_whose_outputs_do_not_match_its_labels_is_refused(
    shapes_model: Path, tmp_path: Path
) -> None:
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    with pytest.raises(ModelLoadError, match="gives 2 classes but has 3 labels"):
        load(ModelSpec(name="shapes", source=str(shapes_model), labels=str(three)))


@pytest.mark.slow
def test_a_model_without_labels_is_refused(shapes_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs a labels file"):
        load(ModelSpec(name="shapes", source=str(shapes_model)))


@pytest.mark.slow
def test_a_model_that_does_not_take_images_is_refused(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(2, activation="softmax")])
    model.save(tmp_path / "tabular.keras")
    (tmp_path / "two.txt").write_text("a\nb\n")
    spec = ModelSpec(
        name="tabular", source=str(tmp_path / "tabular.keras"), labels=str(tmp_path / "two.txt")
    )
    with pytest.raises(ModelLoadError, match="not an image batch"):
        load(spec)


@pytest.mark.slow
def test_the_server_refuses_a_bad_model_before_taking_traffic(
    shapes_model: Path, tmp_path: Path
) -> None:
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    process = start(
        "--model", str(shapes_model), "--labels", str(three), "--port", str(free_port())
    )
    process.wait(timeout=120)
    log = output(process)
    assert process.returncode == 1, log
    assert "gives 2 classes but has 3 labels" in log
    assert "listening on" not in log


@pytest.mark.slow
def test_built_in_models_bring_their_own_size_and_preprocessing() -> None:
    import keras

    classifier = load(ModelSpec(name="effnet", source="efficientnet_b1", weights="none", top_k=3))
    assert classifier.input_shape == (240, 240, 3)
    assert classifier.top_k == 3
    x = np.full((1, 240, 240, 3), 200, np.uint8)
    expected = keras.applications.efficientnet.preprocess_input(x.astype("float32"))
    np.testing.assert_array_equal(classifier.batch(x), expected)


# -- specs and label files (no TensorFlow) -----------------------------------


def test_label_file_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("cat\n\ndog\n")
    (tmp_path / "b.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "c.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    (tmp_path / "d.json").write_text(json.dumps({"0": ["n1", "cat"], "1": ["n2", "dog"]}))
    for name in ("a.txt", "b.json", "c.json", "d.json"):
        assert read_labels(tmp_path / name) == ("cat", "dog"), name


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no labels"), ('{"0": "a", "2": "b"}', "0..n-1"), ("{not json", "not valid JSON")],
)
def test_bad_label_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / ("labels.json" if content.startswith("{") else "labels.txt")
    path.write_text(content)
    with pytest.raises(CatalogError, match=message):
        read_labels(path)


def test_models_file_paths_are_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(
        '[models.a]\nmodel = "sub/a.keras"\nlabels = "sub/a.txt"\n[models.b]\nmodel = "resnet50"\n'
    )
    specs, default = load_models_file(tmp_path / "m.toml")
    assert default == "a"
    assert specs[0].source == str(tmp_path / "sub" / "a.keras")
    assert specs[0].labels == str(tmp_path / "sub" / "a.txt")
    assert specs[1].source == "resnet50"
    assert specs[1].static_size == (224, 224)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no \\[models.NAME\\] tables"),
        ('[models.a]\nweights = "none"\n', "needs 'model'"),
        ('[models.a]\nmodel = "resnet50"\ncolour = "red"\n', "unknown: colour"),
        ('default = "z"\n[models.a]\nmodel = "resnet50"\n', "default model 'z'"),
        ('[models.a]\nmodel = "alexnet"\n', "alexnet' must be sim, a .keras file or one of"),
        ('[models.a]\nmodel = "resnet50"\npreprocessing = "magic"\n', "preprocessing 'magic'"),
        ('[models.A]\nmodel = "resnet50"\n', "lower-case"),
        ("[models\n", "models file"),
        ('[models.a]\nmodel = "resnet50"\ntop_k = "three"\n', "top_k must be a whole number"),
        ('[models.a]\nmodel = "resnet50"\ntop_k = 2.5\n', "top_k must be a whole number"),
        ('[models.a]\nmodel = "resnet50"\ntop_k = 0\n', "top_k must be between 1 and 1000"),
        ("[models]\na = 3\n", "\\[models.a\\] must be a table"),
        ('[models]\na = "resnet50"\n', "\\[models.a\\] must be a table"),
        ("[models.a]\nmodel = 50\n", "'model' must be a string"),
    ],
)
def test_bad_models_files(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(CatalogError, match=message):
        load_models_file(tmp_path / "m.toml")


def test_a_bad_models_file_stops_the_entry_point_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from keras_server.cli import main

    for text in ('[models.a]\nmodel = "resnet50"\ntop_k = "three"\n', "[models]\na = 3\n"):
        (tmp_path / "m.toml").write_text(text)
        assert main(["--models-file", str(tmp_path / "m.toml")], prog="keras-server") == 2
        err = capsys.readouterr().err
        assert err.startswith("keras-server: error: models file"), err
        assert "Traceback" not in err


@pytest.mark.parametrize("weights", ["None", "NONE", "ImageNet"])
def test_weight_names_are_not_taken_for_paths(tmp_path: Path, weights: str) -> None:
    (tmp_path / "m.toml").write_text(f'[models.a]\nmodel = "resnet50"\nweights = "{weights}"\n')
    (spec,), _ = load_models_file(tmp_path / "m.toml")
    assert spec.weights == weights.lower()
    flags = load_settings(["--weights", weights], environ={})
    assert model_specs(flags)[0][0].weights == weights.lower()


def test_one_model_from_flags() -> None:
    settings = load_settings(
        ["--model", "/x/My Model.keras", "--labels", "l.txt", "--top-k", "3"], environ={}
    )
    (spec,), default = model_specs(settings)
    assert default == spec.name == "my-model"
    assert (spec.labels, spec.top_k, spec.preprocessing) == ("l.txt", 3, None)


def test_unknown_model_flag() -> None:
    with pytest.raises(
        SettingsError, match=r"--model='alexnet': must be sim, a \.keras file or one of"
    ):
        load_settings(["--model", "alexnet"], environ={})


@pytest.mark.parametrize(
    ("flags", "table", "message"),
    [
        (["--top-k", "1001"], 'model = "sim"\ntop_k = 1001', "must be between 1 and 1000"),
        (["--top-k", "0"], 'model = "sim"\ntop_k = 0', "must be between 1 and 1000"),
        (["--model", "alexnet"], 'model = "alexnet"', "must be sim, a .keras file or one of"),
    ],
)
def test_flags_and_models_files_share_each_rule(
    tmp_path: Path, flags: list[str], table: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(flags, environ={})
    (tmp_path / "m.toml").write_text(f"[models.a]\n{table}\n")
    with pytest.raises(CatalogError, match=message):
        load_models_file(tmp_path / "m.toml")


def test_the_entry_point_reads_the_models_file_once(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keras_server import catalog, cli
    from keras_server.worker import main as worker_main

    read: list[str] = []
    served: list[str] = []

    def counted(path: str) -> object:
        read.append(path)
        return load_models_file(path)

    monkeypatch.setattr(catalog, "load_models_file", counted)
    # Stop short of serving: no signal handlers or logging set-up in the test process.
    monkeypatch.setattr(
        worker_main, "serve", lambda workers, stop: served.extend(w.name for w in workers)
    )
    monkeypatch.setattr("signal.signal", lambda *args: None)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    (tmp_path / "m.toml").write_text('[models.a]\nmodel = "sim"\n[models.b]\nmodel = "sim"\n')
    argv = ["--role", "worker", "--models-file", str(tmp_path / "m.toml"), "--sim-batch-ms", "0"]
    assert cli.main([*argv, "--redis-url", settings.redis_url]) == 0
    assert served == ["a", "b"]
    assert len(read) == 1
