"""Train a tiny model to serve: bright vs dark squares, in seconds, no download.

    python examples/squares.py models/
    python run_keras_server.py --model models/squares.keras --labels models/squares.txt \\
        --preprocessing scale

It writes `squares.keras` (a grey-scale CNN taking 32x32x1 images) and
`squares.txt` (its two labels, `dark` and `bright`). The tests train it the
same way and check that the server classifies unseen squares correctly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

LABELS = ("dark", "bright")


def squares(n: int, seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """n RGB uint8 images: a bright or a dark square on a noisy mid-grey
    background, and their labels (0 dark, 1 bright)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(128, 20, (n, size, size, 3))
    labels = rng.integers(0, 2, n)
    for image, label in zip(images, labels, strict=True):
        x, y = rng.integers(0, size // 2, 2)
        image[y : y + size // 2, x : x + size // 2] = 240 if label else 15
    return np.clip(images, 0, 255).astype(np.uint8), labels


def train(directory: Path) -> Path:
    """Train the model, save it and its labels in `directory`; returns the .keras path."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(len(LABELS), activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    images, labels = squares(400, seed=0, size=32)
    # What the server will feed it: grey (the mean of RGB), scaled to 0..1.
    model.fit(images.mean(axis=-1, keepdims=True) / 255.0, labels, epochs=8, verbose=0)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "squares.keras"
    model.save(path)
    path.with_suffix(".txt").write_text("\n".join(LABELS) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="models", type=Path)
    path = train(parser.parse_args().directory)
    print(f"wrote {path} and {path.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
