"""The models' input preprocessing: one list of steps per mode, for every engine.

Keras's `preprocess_input` modes (`caffe`, `tf`, `torch`), `scale` and
`none`, applied to a float32 RGB 0..255 batch, are each a short list of
steps (`STEPS`): reverse the channel order (RGB -> BGR), divide by, subtract.
The keras and onnx engines run them in numpy (`preprocessing`); the openvino
engine compiles the same steps into its graph (`openvino_engine`), so it
takes the uint8 batch as the worker has it. They live outside Keras so an
engine served from the conversion cache needs no TensorFlow at all; the tests
check them against Keras's own functions for every built-in model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from keras_server.catalog import ModelSpec

Preprocess = Callable[[np.ndarray], np.ndarray]

# keras.applications.<module>.preprocess_input, by module: its mode. The
# EfficientNet, MobileNetV3 and ConvNeXt models rescale inside the network.
MODULE_MODES = {
    **dict.fromkeys(("resnet50", "resnet", "vgg16", "vgg19"), "caffe"),
    **dict.fromkeys(("resnet_v2", "mobilenet", "mobilenet_v2", "inception_v3", "xception"), "tf"),
    "densenet": "torch",
    **dict.fromkeys(("mobilenet_v3", "efficientnet", "efficientnet_v2", "convnext"), "none"),
}
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def mode_of(spec: ModelSpec) -> str:
    """The preprocessing `spec` asks for, or its built-in model's own."""
    if spec.preprocessing is not None:
        return spec.preprocessing
    if spec.builtin is not None:
        return MODULE_MODES[spec.builtin.module]
    return "none"  # a .keras file's default: it may rescale itself


# ("reverse", None): RGB -> BGR; ("divide", v) and ("subtract", v): by a
# scalar or one value per channel (in the channel order at that step).
Step = tuple[str, np.ndarray | None]
STEPS: dict[str, tuple[Step, ...]] = {
    "caffe": (("reverse", None), ("subtract", CAFFE_MEAN_BGR)),
    "tf": (("divide", np.float32(127.5)), ("subtract", np.float32(1.0))),
    "torch": (("divide", np.float32(255.0)), ("subtract", TORCH_MEAN), ("divide", TORCH_STD)),
    "scale": (("divide", np.float32(255.0)),),
    "none": (),
}


def steps_of(mode: str) -> tuple[Step, ...]:
    """The steps of `mode`, in order (an unknown mode is `none`'s: nothing)."""
    return STEPS.get(mode, ())


def preprocessing(mode: str) -> Preprocess:
    """float32 RGB 0..255 batch -> what the model takes, for `mode`."""
    steps = steps_of(mode)

    def run(x: np.ndarray) -> np.ndarray:
        for op, value in steps:
            if op == "reverse":
                x = x[..., ::-1]
            elif op == "divide":
                x = x / value
            else:
                x = x - value
        return x

    return run


def batch_of(images: np.ndarray, channels: int, preprocess: Preprocess) -> np.ndarray:
    """uint8 RGB images (n, h, w, 3) -> the float32 batch a model with
    `channels` (1 or 3) input channels takes."""
    batch = images.astype(np.float32)
    if channels == 1:
        batch = batch.mean(axis=-1, keepdims=True)
    return np.ascontiguousarray(preprocess(batch), dtype=np.float32)
