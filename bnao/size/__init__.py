"""Model size of architectures in closed form (SPEC section 3).

``model_size`` returns, for every arch, the parameter count (or the
multiply-adds per image) of the stand-alone network that
:func:`bnao.nets.build_network` builds from it, auxiliary head excluded,
without building anything. The compiled kernel ``torch.ops.bnao.model_size``
(``csrc/size``) does millions of archs per second; without it the pure-Python
reference (:mod:`bnao.size.reference`) gives the same numbers, slower.

Counting conventions: see :mod:`bnao.size.reference`.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

from ..extension import has_kernel, has_ops
from ..space.nao import Arch, InvalidArchError, NAOSpace
from ..space.ops import op_table
from .reference import count_reference

# Skeleton codes of the kernel's `skeleton` argument; must equal csrc/size/model_size.h.
SKELETON_CODES = {"cifar": 0, "imagenet": 1}
DEFAULT_IMAGE_SIZE = {"cifar": 32, "imagenet": 224}
# Stride-2 reductions before the cells: none on cifar, three stem convs on imagenet.
STEM_LEVELS = {"cifar": 0, "imagenet": 3}
MEASURES = ("params", "madds", "both")
BACKENDS = ("auto", "cpp", "reference")

if has_ops():
    try:

        @torch.library.register_fake("bnao::model_size")
        def _model_size_fake(archs, num_nodes, op_kinds, op_kernels, skeleton, layers, channels, num_classes,
                             in_channels, image_size):
            torch._check(archs.dim() == 2, lambda: "model_size: archs must be 2-D")
            return archs.new_empty((archs.shape[0], 2), dtype=torch.int64)

    except RuntimeError:  # already registered (module reloaded)
        pass


def min_image_size(skeleton: str) -> int:
    """Smallest input side the stand-alone network of ``skeleton`` can run at.

    Every stride-2 op maps a side ``h`` to ``ceil(h / 2)``, so no map is ever empty; what fails first is a
    factorized reduce, whose second path samples the odd pixels and so needs a side of at least 2. The deepest
    one reads the output of the cells before the second reduction cell (the next cell calibrates it, for any
    arch), at ``STEM_LEVELS + 1`` halvings of the image: that side is at least 2 exactly when the image side
    exceeds ``2 ** (STEM_LEVELS + 1)``. Hence 3 for cifar and 17 for imagenet.

    Args:
        skeleton: ``"cifar"`` or ``"imagenet"``.

    Returns:
        The smallest image side that :func:`bnao.nets.build_network` can run a forward at.
    """
    return 2 ** (STEM_LEVELS[skeleton] + 1) + 1


def check_image_size(skeleton: str, image_size, width=None, flag: Optional[str] = None) -> None:
    """Refuses images the network of ``skeleton`` cannot run on (see :func:`min_image_size`).

    The one check of the minimum for every caller (``bnao size``, stand-alone training, ``bnao eval``,
    ``bnao export``): without it the first forward fails deep inside a convolution.

    Args:
        skeleton: ``"cifar"`` or ``"imagenet"``.
        image_size: The image side (the height when ``width`` is given).
        width: The image width, for images that are not square.
        flag: The option that set the size (e.g. ``"--image-size"``), named in the advice; None when the size
            comes from the data.

    Raises:
        ValueError: The smaller side is below the skeleton's minimum; the message names both.
    """
    height = int(image_size)
    width = height if width is None else int(width)
    smallest = min_image_size(skeleton)
    if min(height, width) < smallest:
        advice = f"use an {flag} of at least {smallest}" if flag else f"use images of at least {smallest}x{smallest}"
        raise ValueError(f"image size {height}x{width} is too small for the {skeleton} skeleton: its network cannot "
                         f"run on images smaller than {smallest}x{smallest}; {advice}")


def image_hw(dataset: Any) -> Optional[Tuple[int, int]]:
    """``(height, width)`` of a data set's images, from its ``image_shape`` (``(H, W, C)``); None if it does not say."""
    shape = getattr(dataset, "image_shape", None)
    if shape is not None and not isinstance(shape, int) and len(shape) >= 2:
        return int(shape[0]), int(shape[1])
    return None


def image_side(dataset: Any, skeleton: Optional[str] = None) -> Optional[int]:
    """The side of a data set's images, from its ``image_shape`` (``(H, W, C)``), for the size formulas.

    The formulas take square images; non-square ones give their height.

    Args:
        dataset: A bnao data set (or anything with an ``image_shape``).
        skeleton: Whose usual side (:data:`DEFAULT_IMAGE_SIZE`) to return when the data set does not say.

    Returns:
        The side; when the data set does not say, the skeleton's usual side, or None without a skeleton.
    """
    hw = image_hw(dataset)
    if hw is not None:
        return hw[0]
    return DEFAULT_IMAGE_SIZE[skeleton] if skeleton is not None else None


def resolve_space(space: Union[str, NAOSpace], num_nodes: int = 5) -> NAOSpace:
    """A :class:`NAOSpace` from a space or an op-set name (with ``num_nodes`` nodes per cell)."""
    if isinstance(space, NAOSpace):
        return space
    if isinstance(space, str):
        return NAOSpace(num_nodes=num_nodes, op_set=space)
    raise TypeError(f"space must be an op-set name or a NAOSpace, got {type(space).__name__}")


def as_arch_array(archs, space: NAOSpace, validate: bool = True) -> np.ndarray:
    """Validated ``[n, 8B]`` int64 array from one arch or many.

    Args:
        archs: One arch (string, :class:`Arch`, JSON-like dict, flat list/array
            of ``8B`` integers) or many (``[n, 8B]`` array or tensor, list of archs).
        space: The space that validates them.
        validate: Check the values of an array input (off when a kernel that checks them follows;
            dtype and shape are always checked).

    Returns:
        ``int64`` array of shape ``[n, 8B]`` (``n = 1`` for one arch).

    Raises:
        InvalidArchError: An arch is not in the space (the message names the arch, cell, node and position).
    """
    if torch.is_tensor(archs):
        archs = archs.detach().cpu().numpy()
    if isinstance(archs, np.ndarray):
        arr = archs[None, :] if archs.ndim == 1 else archs
        if arr.ndim != 2:
            raise InvalidArchError(f"expected an array of shape [n, {space.length}], got {archs.shape}")
        if arr.shape[0] == 0 and arr.shape[1] == space.length:
            return np.zeros((0, space.length), dtype=np.int64)
        if not validate:
            if not np.issubdtype(arr.dtype, np.integer):
                raise InvalidArchError(f"archs must be integers, got dtype {arr.dtype}")
            if arr.shape[1] != space.length:
                raise InvalidArchError(f"expected an array of shape [n, {space.length}], got {arr.shape}")
            return np.ascontiguousarray(arr, dtype=np.int64)
        return np.ascontiguousarray(space.validate_array(arr))
    if isinstance(archs, (str, Arch, dict)):
        return space.arch(archs).to_array()[None, :]
    seq = list(archs)
    if not seq:
        return np.zeros((0, space.length), dtype=np.int64)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in seq):
        return space.arch(seq).to_array()[None, :]
    rows = []
    for i, a in enumerate(seq):
        try:
            rows.append(space.arch(a).to_array())
        except InvalidArchError as err:
            raise InvalidArchError(f"arch {i}: {err}") from None
    return np.stack(rows)


def model_size(
    archs,
    space: Union[str, NAOSpace] = "small",
    skeleton: str = "cifar",
    layers: int = 3,
    channels: int = 20,
    classes: int = 10,
    in_channels: int = 3,
    image_size: Union[int, None] = None,
    measure: str = "params",
    num_nodes: int = 5,
    backend: str = "auto",
) -> np.ndarray:
    """Closed-form size of the stand-alone network of every arch.

    Args:
        archs: One arch (string ``"0 1 0 1 ..."``, :class:`Arch`, flat list) or
            many (``[n, 8B]`` integer array or tensor, list of archs).
        space: Op-set name (``"small"``, ``"middle"``) or a :class:`NAOSpace`.
        skeleton: ``"cifar"`` or ``"imagenet"``.
        layers: ``N`` normal cells between reductions (search default 3).
        channels: ``C`` of the first cells (search default 20).
        classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Input side for multiply-adds (default 32 for cifar, 224 for imagenet).
        measure: ``"params"``, ``"madds"`` (multiply-adds per image) or ``"both"``.
        num_nodes: ``B`` when ``space`` is an op-set name.
        backend: ``"auto"`` (compiled kernel when available), ``"cpp"`` or ``"reference"``.

    Returns:
        ``int64`` array of shape ``[n]`` (``[n, 2]`` = (params, madds) for ``"both"``);
        ``n = 1`` for a single arch.

    Raises:
        InvalidArchError: An arch is not in the space.
        ValueError: An unknown skeleton, measure or backend, a non-positive size, or an image size below
            :func:`min_image_size` of the skeleton.
        RuntimeError: ``backend="cpp"`` without the compiled kernel.
    """
    space = resolve_space(space, num_nodes)
    if skeleton not in SKELETON_CODES:
        raise ValueError(f"unknown skeleton {skeleton!r}; choose one of {sorted(SKELETON_CODES)}")
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {MEASURES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE[skeleton]
    for name, value in (("layers", layers), ("channels", channels), ("classes", classes),
                        ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # Checked for every measure: the parameters of a network that cannot run describe nothing usable.
    check_image_size(skeleton, image_size, flag="image_size (--image-size)")
    if skeleton == "imagenet" and channels < 2:
        raise ValueError("the imagenet skeleton needs channels >= 2 (its first stem conv has channels // 2)")
    use_cpp = backend == "cpp" or (backend == "auto" and has_kernel("model_size", "cpu"))
    if use_cpp and not has_kernel("model_size", "cpu"):
        raise RuntimeError("backend='cpp' but the compiled model_size kernel is not available (see `bnao info`)")
    # The kernel checks every value itself in its single pass; validating a pool of
    # millions in numpy first would cost more than counting it.
    arr = as_arch_array(archs, space, validate=not use_cpp)
    if use_cpp:
        table = op_table(space.op_set)
        try:
            out = torch.ops.bnao.model_size(
                torch.from_numpy(arr), space.num_nodes, [k for k, _ in table], [s for _, s in table],
                SKELETON_CODES[skeleton], int(layers), int(channels), int(classes), int(in_channels),
                int(image_size),
            ).numpy()
        except RuntimeError:
            # Re-raise an invalid arch as the space words it (arch, cell, node, position).
            space.validate_array(arr)
            raise
    else:
        out = np.zeros((arr.shape[0], 2), dtype=np.int64)
        for i, row in enumerate(arr.tolist()):
            out[i] = count_reference(row, space.num_nodes, space.op_set, skeleton, int(layers), int(channels),
                                     int(classes), int(in_channels), int(image_size))
    if measure == "params":
        return out[:, 0].copy()
    if measure == "madds":
        return out[:, 1].copy()
    return out


__all__ = ["DEFAULT_IMAGE_SIZE", "MEASURES", "SKELETON_CODES", "as_arch_array", "check_image_size", "count_reference",
           "image_hw", "image_side", "min_image_size", "model_size", "resolve_space"]
