"""The real model path: ResNet50 loaded through --weights, served through
/predict, gives what Keras itself predicts for the same image."""

from pathlib import Path

import numpy as np
import pytest
from conftest import CHELSEA, IMAGES, CountingPredictor, WorkerThread, make_worker, post_images

from keras_server.catalog import ModelSpec
from keras_server.engines.keras_engine import load_classifier
from keras_server.engines.predictor import ModelLoadError, warm_up
from keras_server.labels import imagenet_labels
from keras_server.settings import Settings
from keras_server.web.app import create_app

pytestmark = pytest.mark.slow


def resnet50(weights: str) -> ModelSpec:
    """ResNet50 with `weights`, as --weights describes it."""
    return ModelSpec(name="resnet50", source="resnet50", weights=weights)


def keras_top5(model: object, image_path: Path) -> list[tuple[str, float]]:
    """Keras's own model the textbook way (preprocess, predict) on the pixels
    the server decodes: how close that decode is to Pillow's bicubic resize
    (within 1/255 on average) is tests/test_images.py's to check."""
    import keras

    from keras_server.images import load_image

    pixels = load_image(image_path.read_bytes(), (224, 224), 50_000_000)
    batch = keras.applications.resnet50.preprocess_input(pixels[None].astype("float32"))
    probabilities = model.predict(batch, verbose=0)[0]
    labels = imagenet_labels()
    best = np.argsort(-probabilities)[:5]
    return [(labels[i], float(probabilities[i])) for i in best]


def test_predict_equals_keras_on_the_same_weights(
    resnet_model: object, resnet_classifier: object, settings: Settings
) -> None:
    """Our engine, loaded through --weights (the session's resnet_classifier),
    served through /predict, against Keras' own model."""
    classifier = resnet_classifier
    warm_up(classifier, 2)
    client = create_app(settings).test_client()
    with WorkerThread(make_worker(settings, CountingPredictor(classifier))):
        response = post_images(client, ("chelsea.png", CHELSEA))
    assert response.status_code == 200
    served = [(p["label"], p["probability"]) for p in response.get_json()["predictions"]]
    expected = keras_top5(resnet_model, IMAGES / "chelsea.png")
    assert [label for label, _ in served] == [label for label, _ in expected]
    np.testing.assert_allclose([p for _, p in served], [p for _, p in expected], rtol=1e-4)


def test_whole_saved_model_loads_too(tmp_path: Path, resnet_model: object) -> None:
    import keras

    model = resnet_model
    path = tmp_path / "resnet50.keras"
    model.save(path)
    classifier = load_classifier(resnet50(str(path)))
    image = np.zeros((1, 224, 224, 3), np.uint8)
    np.testing.assert_allclose(
        classifier.predict(image),
        model.predict_on_batch(
            keras.applications.resnet50.preprocess_input(image.astype("float32"))
        ),
        rtol=1e-5,
        atol=1e-7,
    )


def test_weights_none_builds_resnet50() -> None:
    classifier = load_classifier(resnet50("none"))
    assert classifier.model.name == "resnet50"
    assert "RANDOM" in classifier.description
    assert classifier.predict(np.zeros((2, 224, 224, 3), np.uint8)).shape == (2, 1000)


def test_missing_file_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_classifier(resnet50(str(tmp_path / "nope.weights.h5")))


def test_unusable_file_is_refused_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ModelLoadError, match="cannot load it"):
        load_classifier(resnet50(str(junk)))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"expected a \.weights\.h5 or \.keras file"):
        load_classifier(resnet50(str(other)))


def test_a_model_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    path = tmp_path / "tiny.keras"
    model.save(path)
    with pytest.raises(ModelLoadError, match="gives 10 classes but has 1000 labels"):
        load_classifier(resnet50(str(path)))


def test_labels_are_keras_short_names() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[162] == "beagle"
    assert labels[166] == "Walker_hound"
    assert labels[281] == "tabby"
    assert labels[967] == "espresso"
