"""Export a checkpoint to TorchScript, ONNX or a Triton model repository.

The exported graph takes the *preprocessed* image tensor and returns class
probabilities (softmax, sigmoid or ordinal), so a consumer needs only the
card's preprocessing spec, written beside the file as ``<out>.json``.

``--format triton`` writes a model repository for NVIDIA Triton Inference Server
(:func:`export_triton`): the ONNX graph, a ``config.pbtxt`` with the input and output
from the card, the dynamic batcher and two priority levels (urgent, routine), and the
card itself as the config parameter ``medclass_card`` so a client can check what it
talks to (:mod:`medclass.remote`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from medclass.checkpoint import LoadedModel, load_checkpoint
from medclass.errors import MedClassError
from medclass.tasks import Task

FORMATS = ("torchscript", "onnx", "triton")
#: Triton backends an exported repository can name: NVIDIA's onnxruntime backend (production), or the
#: Python backend running the same ONNX file with onnxruntime (what pytriton's tritonserver can run).
TRITON_BACKENDS = ("onnxruntime", "python")


class ProbabilityModel(nn.Module):
    """A zoo model followed by its calibration (if the card has one) and its task's probability
    function (image input only), so that an exported model gives the checkpoint's probabilities."""

    def __init__(self, model: nn.Module, task: Task, card: dict | None = None):
        super().__init__()
        from medclass.calibration import card_scaling

        self.model = model
        self.task = task
        t, bias = card_scaling(card)
        self.register_buffer("temperature", torch.as_tensor(1.0 if t is None else t, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(0.0 if bias is None else bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task.probabilities(self.model(x) / self.temperature + self.bias)


def example_input(loaded: LoadedModel, batch: int = 2) -> torch.Tensor:
    spec = loaded.preprocess_spec
    side = spec["image_size"]
    spatial = (side, side) if spec["spatial_dims"] == 2 else (spec["depth"], side, side)
    return torch.rand(batch, loaded.card["model"]["args"]["in_channels"], *spatial)


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, **triton) -> Path:
    """Write ``checkpoint`` as ``fmt`` to ``out`` plus ``out.json`` (the card).

    ``fmt == "triton"`` writes a model repository at ``out`` instead (see :func:`export_triton`,
    which takes the keyword arguments ``triton``) and returns the model's folder.
    """
    if fmt == "triton":
        return export_triton(checkpoint, out, **triton)
    if fmt not in FORMATS:
        raise MedClassError(f"unknown export format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    loaded = load_checkpoint(checkpoint, "cpu")
    if not loaded.is_torch:
        raise MedClassError(f"{loaded.name} is a classic (scikit-learn) model", "only torch models export")
    wrapped = ProbabilityModel(loaded.model, loaded.task, loaded.card).eval()
    x = example_input(loaded)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(wrapped, x, check_trace=False).save(str(out))
        else:
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise MedClassError("ONNX export needs the onnx package",
                                    "from a clone of SlicerMedClass: pip install -e '.[export]' (or make install)") from None
            torch.onnx.export(wrapped, (x,), str(out), input_names=["image"], output_names=["probabilities"],
                              dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                              opset_version=17, dynamo=False)
    Path(str(out) + ".json").write_text(json.dumps(loaded.card, indent=2))
    return out


PYTHON_BACKEND_MODEL = '''"""Triton Python backend: runs the exported ONNX graph with onnxruntime (written by medclass export)."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        # The dynamic batcher hands over several requests at once: one onnxruntime run for all of them.
        xs = [pb_utils.get_input_tensor_by_name(r, "{input}").as_numpy() for r in requests]
        y = self.session.run(["{output}"], {"{input}": np.concatenate(xs)})[0]
        responses, i = [], 0
        for x in xs:
            out = pb_utils.Tensor("{output}", np.ascontiguousarray(y[i:i + len(x)], dtype=np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            i += len(x)
        return responses
'''


def _pbtxt_string(text: str) -> str:
    """``text`` as a protobuf text-format string literal."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def triton_config(name: str, card: dict, input_dims: list[int], output_dims: list[int], backend: str,
                  max_batch_size: int, max_queue_delay_us: int = 2000) -> str:
    """The ``config.pbtxt`` of an exported model (see :func:`export_triton`)."""
    from medclass.remote import CARD_PARAMETER, INPUT_NAME, OUTPUT_NAME, PRIORITIES

    preferred = sorted({b for b in (max_batch_size // 4, max_batch_size // 2, max_batch_size) if b >= 2})
    dims = lambda d: "[ " + ", ".join(str(int(v)) for v in d) + " ]"  # noqa: E731
    lines = [
        f"name: {_pbtxt_string(name)}",
        f"backend: {_pbtxt_string(backend)}",
        f"max_batch_size: {int(max_batch_size)}",
        f"input [ {{ name: \"{INPUT_NAME}\" data_type: TYPE_FP32 dims: {dims(input_dims)} }} ]",
        f"output [ {{ name: \"{OUTPUT_NAME}\" data_type: TYPE_FP32 dims: {dims(output_dims)} }} ]",
        "dynamic_batching {",
        f"  preferred_batch_size: {dims(preferred or [max_batch_size])}",
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
        # Two levels: urgent (1, served first) and routine (2, the default for a request that names none).
        f"  priority_levels: {max(PRIORITIES.values())}",
        f"  default_priority_level: {PRIORITIES['routine']}",
        # No queue limit and no timeout by default: the client's own deadline decides; a client may set one.
        "  default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 0 "
        "allow_timeout_override: true max_queue_size: 0 }",
        "}",
    ]
    if backend == "python":
        # One CPU instance; onnxruntime inside it uses its own threads.
        lines.append("instance_group [ { count: 1 kind: KIND_CPU } ]")
    lines += ["parameters [",
              f"  {{ key: \"{CARD_PARAMETER}\" value: {{ string_value: {_pbtxt_string(json.dumps(card))} }} }}",
              "]"]
    return "\n".join(lines) + "\n"


def parse_triton_config(text: str):
    """Parse a ``config.pbtxt`` into Triton's own ``ModelConfig`` message (from ``tritonclient``).

    Raises
    ------
    MedClassError
        ``tritonclient`` is missing, or the text is not a valid model configuration.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MedClassError("checking a Triton configuration needs the Triton client",
                            "from a clone of SlicerMedClass: pip install -e '.[triton]' (or make install)") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise MedClassError(f"invalid Triton model configuration ({e})", "report this as a bug") from None


def export_triton(checkpoint: str | Path, repository: str | Path, model_name: str | None = None,
                  backend: str = "onnxruntime", max_batch_size: int = 32, max_queue_delay_us: int = 2000) -> Path:
    """Write a Triton model repository serving ``checkpoint``.

    Layout: ``REPOSITORY/MODEL/config.pbtxt`` and ``REPOSITORY/MODEL/1/model.onnx`` (with
    ``model.onnx.json``, the card), plus ``1/model.py`` for the Python backend.

    Parameters
    ----------
    checkpoint : str or Path
        A ``model.pt``.
    repository : str or Path
        The model repository (created; other models in it are left alone).
    model_name : str, optional
        The name clients ask for (default: the checkpoint's model name).
    backend : str
        ``onnxruntime`` (NVIDIA's container, CPU or GPU) or ``python`` (the Python backend
        running the ONNX file with onnxruntime).
    max_batch_size : int
        The largest batch Triton forms; the dynamic batcher prefers it, half and a quarter of it.
    max_queue_delay_us : int
        How long the batcher may hold a request to fill a batch.

    Returns
    -------
    Path
        The model's folder ``REPOSITORY/MODEL``.
    """
    import re

    if backend not in TRITON_BACKENDS:
        raise MedClassError(f"unknown Triton backend {backend!r}", f"use one of {', '.join(TRITON_BACKENDS)}")
    if max_batch_size < 1:
        raise MedClassError(f"--max-batch-size must be at least 1 (got {max_batch_size})", "pass e.g. 32")
    loaded = load_checkpoint(checkpoint, "cpu")
    if not loaded.is_torch or loaded.family == "crossmodal":
        raise MedClassError(f"{loaded.name} cannot be served by Triton (only image-input torch models export)",
                            "use local inference for it")
    name = model_name or loaded.name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise MedClassError(f"invalid Triton model name {name!r}", "use letters, digits, '_', '.' and '-'")
    folder = Path(repository) / name
    onnx_path = export_checkpoint(checkpoint, "onnx", folder / "1" / "model.onnx")
    x = example_input(loaded, 1)
    with torch.no_grad():
        y = ProbabilityModel(loaded.model, loaded.task, loaded.card).eval()(x)
    from medclass.remote import INPUT_NAME, OUTPUT_NAME

    if backend == "python":
        (folder / "1" / "model.py").write_text(PYTHON_BACKEND_MODEL.replace("{input}", INPUT_NAME)
                                           .replace("{output}", OUTPUT_NAME))
    text = triton_config(name, loaded.card, list(x.shape[1:]), list(y.shape[1:]), backend, max_batch_size,
                         max_queue_delay_us)
    parsed = parse_triton_config(text)  # what Triton will read: refuse to write a config it cannot parse
    if parsed.parameters["medclass_card"].string_value != json.dumps(loaded.card):
        raise MedClassError("the model card did not survive config.pbtxt", "report this as a bug")
    (folder / "config.pbtxt").write_text(text)
    assert onnx_path.is_file()
    return folder
