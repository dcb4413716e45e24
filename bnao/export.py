"""Exporting trained networks so that code without bnao can run them.

Three formats:

* ``torchscript``: a traced module; ``torch.jit.load(path)`` runs it, no bnao needed.
* ``onnx``: an ONNX graph (batch axis dynamic); onnxruntime runs it, no bnao or torch needed.
* ``state_dict``: the plain ``{name: tensor}`` weights of :func:`bnao.nets.build_network`'s network,
  for training or fine-tuning a found arch in one's own pipeline.

The exported network is the inference network: it is rebuilt without the
auxiliary head, without drop-path and without dropout, and traced in eval
mode, so no training-only branch is in the graph. Every export is checked:
the exported file is loaded back the way a user would load it and run on a
random batch, and the largest difference to the original network's logits is
reported (:func:`export_network`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .nets.network import build_network
from .safe_io import DamagedFileError, UnsafeFileError, safe_load
from .space import InvalidArchError, NAOSpace, create_search_space
from .size import DEFAULT_IMAGE_SIZE, check_image_size

FORMATS = ("torchscript", "onnx", "state_dict")
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
# Image side of the data sets bnao knows; other models fall back to their skeleton's usual side.
DATASET_IMAGE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32, "imagenet": 224}
# Keys of a bnao network that exist only for training.
_TRAINING_ONLY_PREFIXES = ("auxiliary_head.",)
_NETWORK_KEYS = ("arch", "space", "skeleton", "layers", "channels", "num_classes", "in_channels")


class ExportError(ValueError):
    """A model cannot be loaded or exported (the message says what was found and what to do)."""


@dataclass
class ExportSource:
    """A trained network ready to export.

    Attributes:
        model: The inference network (eval mode, no auxiliary head, no drop-path, no dropout).
        config: ``arch``, ``space`` (op set and nodes), ``skeleton``, ``layers``, ``channels``,
            ``num_classes``, ``in_channels``: what :func:`bnao.nets.build_network` needs to rebuild it.
        origin: What was read (``"bnao model file"``, ``"bnao train checkpoint"``, ``"state dict"``).
        dataset: The data set it was trained on, when the file records it.
        metrics: The final metrics a model file records.
        image_size: The training images' side, when the file records it (model files and checkpoints
            of this bnao; older checkpoints record neither it nor the dataset).
    """

    model: nn.Module
    config: Dict[str, Any]
    origin: str
    dataset: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    image_size: Optional[int] = None


def inference_network(config: Dict[str, Any], state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """Builds the inference network of ``config`` and loads ``state_dict`` into it (strictly).

    Weights of training-only modules (the auxiliary head) are dropped first.

    Raises:
        ExportError: The weights do not fit the network (missing, unexpected or mis-shaped tensors).
    """
    space = _space_of(config)
    with torch.device("meta"):
        # Built on meta (no initialisation cost); the real tensors come from the state dict.
        model = build_network(config["arch"], space, skeleton=config["skeleton"], layers=config["layers"],
                              channels=config["channels"], num_classes=config["num_classes"],
                              in_channels=config["in_channels"], auxiliary=False, drop_path_keep_prob=None,
                              dropout=0.0)
    model = model.to_empty(device="cpu")
    weights = {k: v for k, v in state_dict.items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        detail = str(err).split("\n", 1)[-1].strip()[:600]
        raise ExportError(f"the weights do not fit arch {config['arch']!r} at skeleton {config['skeleton']}, "
                          f"N={config['layers']}, C={config['channels']}: {detail}. Pass the arch the weights were "
                          "trained with (and --space/--nodes when they differ from small/5).") from None
    return model.eval()


def _space_of(config: Dict[str, Any]) -> NAOSpace:
    space = config["space"]
    if isinstance(space, NAOSpace):
        return space
    return create_search_space("nao", **space)


def _read(path: Union[str, os.PathLike]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file. Pass the model.pt written by `bnao train --out DIR`, or an arch "
                          "with --weights FILE.")
    try:
        return safe_load(path)
    except UnsafeFileError:
        # A readable pickle that names Python callables; never unpickle those from a file the user points at.
        raise ExportError(f"{path}: not a bnao model: it holds pickled Python objects (e.g. a whole nn.Module "
                          "saved with torch.save(model)), which are not loaded. Pass the model.pt written by "
                          "`bnao train`, or save model.state_dict() and pass it with its arch.") from None
    except DamagedFileError:
        raise ExportError(f"{path}: not a bnao model: torch.load cannot read it, so it is not a readable "
                          "checkpoint: it is damaged or not a checkpoint or weights file. "
                          "Pass the model.pt or checkpoint.pt written by `bnao train` (retrain if it was "
                          "damaged), or a state dict saved with torch.save(model.state_dict()) with its "
                          "arch.") from None


def _describe(obj: Any) -> str:
    """A short description of what a file held, for error messages."""
    if isinstance(obj, dict):
        keys = list(obj)[:6]
        fmt = obj.get("format")
        tag = f" with format {fmt!r}" if fmt is not None else ""
        return f"a dict{tag} and keys {keys}{' ...' if len(obj) > 6 else ''}"
    return f"a {type(obj).__name__}"


def load_for_export(path: Union[str, os.PathLike], arch: Optional[str] = None, op_set: Optional[str] = None,
                    num_nodes: Optional[int] = None) -> ExportSource:
    """Reads a trained network: a ``bnao train`` model file or checkpoint, or an arch plus a plain state dict.

    Args:
        path: ``model.pt`` or ``checkpoint.pt`` of ``bnao train``, or a ``torch.save(model.state_dict())`` file
            of a :func:`bnao.nets.build_network` network (then ``arch`` is required).
        arch: The arch of a plain state dict; with a bnao file it must equal the stored arch.
        op_set: Op set of a plain state dict's arch (default ``small``).
        num_nodes: Nodes per cell of a plain state dict's arch (default: arch length / 8).

    Returns:
        The :class:`ExportSource`.

    Raises:
        ExportError: The file is missing, unreadable, not a bnao model, or its weights do not fit.
    """
    data = _read(path)
    if isinstance(data, dict) and data.get("format") in ("bnao-model", "bnao-standalone-checkpoint"):
        origin = "bnao model file" if data["format"] == "bnao-model" else "bnao train checkpoint"
        stored = data.get("config") or {}
        missing = [k for k in _NETWORK_KEYS if k not in stored]
        if missing:
            raise ExportError(f"{path}: a {origin} without the network settings {missing}; retrain it with "
                              "`bnao train`.")
        config = {k: stored[k] for k in _NETWORK_KEYS}
        if arch is not None and _canonical(arch, config) != config["arch"]:
            raise ExportError(f"{path} holds arch {config['arch']!r}, not {arch!r}; drop the arch argument.")
        weights = data.get("state_dict" if data["format"] == "bnao-model" else "model")
        if not _is_state_dict(weights):
            raise ExportError(f"{path}: a {origin} without its weights (found {_describe(weights)}); retrain it.")
        # Checkpoints written before they recorded the data have no "extra": the skeleton's size is used.
        extra = data.get("extra") or {}
        model = inference_network(config, weights)
        return ExportSource(model, config, origin, extra.get("dataset"), dict(data.get("metrics") or {}),
                            extra.get("image_size"))
    if not _is_state_dict(data):
        raise ExportError(f"{path}: not a bnao model: found {_describe(data)}. Pass the model.pt written by "
                          "`bnao train`, or a state dict saved with torch.save(model.state_dict()) together with "
                          "its arch.")
    if arch is None:
        raise ExportError(f"{path} is a plain state dict: give its arch too (`bnao export ARCH --weights {path}`).")
    config = infer_config(data, arch, op_set, num_nodes)
    return ExportSource(inference_network(config, data), config, "state dict")


def _is_state_dict(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in data.items())


def _canonical(arch: Any, config: Dict[str, Any]) -> str:
    try:
        return str(_space_of(config).arch(arch))
    except InvalidArchError as err:
        raise ExportError(f"invalid arch: {err}") from None


def infer_config(state_dict: Dict[str, torch.Tensor], arch: Any, op_set: Optional[str] = None,
                 num_nodes: Optional[int] = None) -> Dict[str, Any]:
    """The network settings of a :func:`bnao.nets.build_network` state dict, read off its tensor names and shapes.

    Skeleton from the stem's name, ``C`` and input channels from the stem conv, classes from the classifier,
    ``N`` from the number of cells (``3N + 2``).

    Raises:
        ExportError: The tensors are not those of a bnao network, or the arch is invalid.
    """
    if "stem.0.weight" in state_dict:
        skeleton, stem = "cifar", state_dict["stem.0.weight"]
        channels, in_channels = stem.shape[0] // 3, stem.shape[1]
    elif "stem0.0.weight" in state_dict and "stem0.3.weight" in state_dict:
        skeleton = "imagenet"
        channels, in_channels = state_dict["stem0.3.weight"].shape[0], state_dict["stem0.0.weight"].shape[1]
    else:
        raise ExportError("the state dict has no stem conv ('stem.0.weight' or 'stem0.0.weight'): it is not the "
                          f"state dict of a bnao network (first keys: {list(state_dict)[:5]})")
    if "classifier.weight" not in state_dict:
        raise ExportError("the state dict has no 'classifier.weight': it is not the state dict of a bnao network")
    cells = {int(k.split(".")[1]) for k in state_dict if k.startswith("cells.")}
    num_cells = max(cells) + 1 if cells else 0
    if num_cells < 5 or (num_cells - 2) % 3:
        raise ExportError(f"the state dict has {num_cells} cells; a bnao network has 3N + 2 (N >= 1)")
    text = arch if isinstance(arch, str) else " ".join(map(str, arch))
    length = len(text.replace(",", " ").split()) if not text.lstrip().startswith(("{", "[")) else None
    nodes = num_nodes or (length // 8 if length else 5)
    try:
        space = NAOSpace(num_nodes=int(nodes), op_set=op_set or "small")
        arch_text = str(space.arch(arch))
    except (InvalidArchError, ValueError) as err:
        raise ExportError(f"invalid arch: {err}") from None
    return {"arch": arch_text, "space": space.config(), "skeleton": skeleton, "layers": (num_cells - 2) // 3,
            "channels": int(channels), "num_classes": int(state_dict["classifier.weight"].shape[0]),
            "in_channels": int(in_channels)}


def default_image_size(source: ExportSource) -> int:
    """Image side of the export check and trace: the training data set's, else the skeleton's usual one.

    The side comes from the file's record of the training images, else from its dataset's name; files that
    record neither (checkpoints of older bnao versions, plain state dicts) get the skeleton's side.
    """
    if source.image_size:
        return int(source.image_size)
    return DATASET_IMAGE_SIZE.get(source.dataset or "", DEFAULT_IMAGE_SIZE[source.config["skeleton"]])


def _metadata(config: Dict[str, Any], input_shape: Sequence[int]) -> Dict[str, Any]:
    return {"format": "bnao-export", "input_shape": [None, *input_shape[1:]], "network": dict(config)}


def _check_batch(input_shape: Sequence[int], batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape[1:], generator=generator)


def _write_torchscript(model: nn.Module, out: Path, example: torch.Tensor, meta: Dict[str, Any]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not removed; it is what users load
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"bnao.json": json.dumps(meta)})

    def run_exported(images: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(out), map_location="cpu")
            return loaded(images)

    return run_exported, None


def _write_state_dict(model: nn.Module, out: Path, config: Dict[str, Any]):
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, str(out))

    def run_exported(images: torch.Tensor) -> torch.Tensor:
        # Exactly what a user's own pipeline does: build_network(arch, ...) + load_state_dict.
        rebuilt = build_network(config["arch"], _space_of(config), skeleton=config["skeleton"],
                                layers=config["layers"], channels=config["channels"],
                                num_classes=config["num_classes"], in_channels=config["in_channels"])
        rebuilt.load_state_dict(torch.load(str(out), map_location="cpu", weights_only=True))
        return rebuilt.eval()(images)

    return run_exported, None


def _onnx_exporter(choice: str) -> str:
    if choice not in ONNX_EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {choice!r}; choose one of {ONNX_EXPORTERS}")
    try:
        import onnx  # noqa: F401 - both exporters write through it
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: `pip install onnx onnxruntime` (onnxruntime "
                          "checks the exported graph)") from None
    if choice != "auto":
        return choice
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


def _write_onnx(model: nn.Module, out: Path, example: torch.Tensor, meta: Dict[str, Any], exporter: str,
                opset: Optional[int]):
    kind = _onnx_exporter(exporter)
    names = {"input_names": ["images"], "output_names": ["logits"], "opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is deprecated
        if kind == "dynamo":
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                        external_data=False, verbose=False, **names)
            program.save(str(out))
        else:
            torch.onnx.export(model, (example,), str(out), dynamo=False, external_data=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **names)
    import onnx

    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    # What rebuilt the network, readable by any ONNX tool (onnx.load(path).metadata_props).
    entry = graph.metadata_props.add()
    entry.key, entry.value = "bnao", json.dumps(meta)
    onnx.save(graph, str(out))
    try:
        import onnxruntime
    except ImportError:
        return None, f"onnxruntime is not installed: the graph passed onnx.checker but was not run ({kind} exporter)"

    def run_exported(images: torch.Tensor) -> torch.Tensor:
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        result = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        return torch.from_numpy(result)

    return run_exported, None


def export_network(source: ExportSource, fmt: str, out: Union[str, os.PathLike], *,
                   image_size: Optional[int] = None, tolerance: float = 1e-4, check_batch: int = 3, seed: int = 0,
                   onnx_exporter: str = "auto", opset: Optional[int] = None) -> Dict[str, Any]:
    """Writes ``source``'s network in ``fmt`` and checks the file against the original network.

    The trace uses a batch of 2 and the check a batch of ``check_batch`` (3 by default), so a
    graph that froze the batch size fails the check instead of passing it.

    Args:
        source: From :func:`load_for_export`.
        fmt: ``"torchscript"``, ``"onnx"`` or ``"state_dict"``.
        out: Destination file.
        image_size: Input side (default: :func:`default_image_size`).
        tolerance: Largest accepted difference, relative to ``max(1, max |original logit|)``.
        check_batch: Images in the random check batch.
        seed: Seed of the random batch.
        onnx_exporter: ``auto`` (torch.export-based when onnxscript is installed, else TorchScript-based),
            ``dynamo`` or ``torchscript``.
        opset: ONNX opset (default: the exporter's).

    Returns:
        ``format``, ``out``, ``input_shape``, ``max_abs_diff`` (None when the file could not be run),
        ``max_abs_output``, ``tolerance``, ``ok`` and ``note``.

    Raises:
        ExportError: Unknown format, bad arguments, or a missing optional package.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    # `is None`, not `or`: an image size of 0 is an error, not "the default".
    side = int(default_image_size(source) if image_size is None else image_size)
    try:  # else the trace fails deep inside a convolution
        check_image_size(source.config["skeleton"], side, flag="--image-size")
    except ValueError as err:
        hint = "" if image_size is None else ", or leave it out to use the training data's size"
        raise ExportError(f"{err}{hint}") from None
    if check_batch < 1 or not tolerance > 0:
        raise ExportError(f"the check batch must be >= 1 and --tolerance above 0, got {check_batch} and {tolerance}")
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise ExportError(f"the directory of --out {out} does not exist; create it first")
    model = source.model.eval()
    input_shape = (1, source.config["in_channels"], side, side)
    example = _check_batch(input_shape, 2, seed + 1)
    meta = _metadata(source.config, input_shape)
    if fmt == "torchscript":
        run_exported, note = _write_torchscript(model, out, example, meta)
    elif fmt == "onnx":
        run_exported, note = _write_onnx(model, out, example, meta, onnx_exporter, opset)
    else:
        run_exported, note = _write_state_dict(model, out, source.config)
    images = _check_batch(input_shape, check_batch, seed)
    with torch.no_grad():
        reference = model(images)
        exported = run_exported(images) if run_exported is not None else None
    scale = float(reference.abs().max())
    result = {"format": fmt, "out": str(out), "input_shape": [check_batch, *input_shape[1:]],
              "max_abs_output": scale, "tolerance": tolerance, "max_abs_diff": None, "ok": True, "note": note}
    if exported is not None:
        diff = float((exported.float() - reference).abs().max())
        result["max_abs_diff"] = diff
        result["ok"] = bool(exported.shape == reference.shape and diff <= tolerance * max(1.0, scale))
    return result
