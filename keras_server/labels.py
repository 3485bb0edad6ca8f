"""Class names. The 1000 ImageNet classes ship with the package, under the
short names Keras's decode_predictions uses (`tabby`, `Walker_hound`),
because Keras downloads its own copy at run time, which fails offline."""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("imagenet_class_index.json").read_text()
    index = json.loads(text)
    return tuple(index[str(i)][1] for i in range(len(index)))
