"""Safe reading and failure-proof writing of every file bnao stores.

Reading: every checkpoint and model file is loaded with ``torch.load(...,
weights_only=True)``, which unpickles only tensors and plain Python (dict,
list, tuple, str, numbers, ...), so a file from someone else cannot run code
when it is opened. NumPy arrays, which the search state holds, are stored
through :func:`encode` as a tagged dict around a ``uint8`` tensor of their
bytes (dtype and shape beside it) and rebuilt by :func:`decode`; this works on
every torch >= 2.4 and numpy 1 or 2 without allow-listing numpy's pickling
internals (whose module paths differ between numpy versions).

Writing: :func:`atomic_write_bytes` writes a temporary file in the
destination's folder, flushes it to disk and renames it over the destination,
optionally first keeping the current file as ``previous``. A failure at any
point (disk full, no permission, read-only file system) removes the temporary
file, leaves the existing files as they were and raises :class:`FileWriteError`
naming the path, the cause and the fix.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, List, Optional, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]

# Tag keys of encoded NumPy values; a dict holding one of them is decoded back to NumPy.
_ARRAY_TAG = "__bnao_ndarray__"
_SCALAR_TAG = "__bnao_npscalar__"


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, unreadable, or of the wrong kind."""


class UnsafeFileError(CheckpointError):
    """A file needs arbitrary unpickling (it names Python callables), so it is refused unread."""


class DamagedFileError(CheckpointError):
    """A file is truncated or corrupt: torch cannot parse it."""


class FileWriteError(OSError):
    """A file could not be written; the previous version of it is intact."""


# ---------------------------------------------------------------------- encoding
def _encode_array(value: np.ndarray, tag: str) -> dict:
    if value.dtype.hasobject:
        raise TypeError(f"cannot store a NumPy array of Python objects (dtype {value.dtype}) safely; "
                        "convert it to a list or a numeric array first")
    raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    return {tag: torch.from_numpy(raw.copy()), "dtype": value.dtype.str, "shape": list(value.shape)}


def encode(obj: Any) -> Any:
    """Replaces every NumPy array and NumPy scalar inside ``obj`` by a tagged dict around a tensor.

    Dicts (including OrderedDict), lists and tuples are walked; anything else
    is returned as it is.

    Args:
        obj: A checkpoint's content.

    Returns:
        The same structure, loadable with ``torch.load(..., weights_only=True)``.

    Raises:
        TypeError: An array holds Python objects (dtype ``object``).
    """
    if isinstance(obj, np.ndarray):
        return _encode_array(obj, _ARRAY_TAG)
    if isinstance(obj, np.generic):
        return _encode_array(np.asarray(obj), _SCALAR_TAG)
    if isinstance(obj, dict):
        encoded = type(obj)() if type(obj) is not dict else {}
        for key, value in obj.items():
            encoded[key] = encode(value)
        return encoded
    if isinstance(obj, list):
        return [encode(value) for value in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(encode(value) for value in obj)
    return obj


def _decode_array(tagged: dict, tag: str) -> Any:
    raw = tagged[tag]
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise DamagedFileError(f"an encoded NumPy value holds {type(raw).__name__}, not a uint8 tensor")
    try:
        dtype = np.dtype(str(tagged["dtype"]))
        shape = tuple(int(d) for d in tagged["shape"])
        if dtype.hasobject:
            raise ValueError("object arrays are never stored")
        array = np.frombuffer(raw.contiguous().numpy().tobytes(), dtype=dtype).reshape(shape).copy()
    except (KeyError, TypeError, ValueError) as err:
        raise DamagedFileError(f"an encoded NumPy value is malformed ({err})") from None
    return array[()] if tag == _SCALAR_TAG else array


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`: tagged dicts become NumPy arrays and scalars again."""
    if isinstance(obj, dict):
        if _ARRAY_TAG in obj:
            return _decode_array(obj, _ARRAY_TAG)
        if _SCALAR_TAG in obj:
            return _decode_array(obj, _SCALAR_TAG)
        decoded = type(obj)() if type(obj) is not dict else {}
        for key, value in obj.items():
            decoded[key] = decode(value)
        return decoded
    if isinstance(obj, list):
        return [decode(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(decode(value) for value in obj)
    return obj


def dumps(obj: Any) -> bytes:
    """Serialises ``obj`` (after :func:`encode`) with :func:`torch.save` into bytes."""
    buffer = io.BytesIO()
    torch.save(encode(obj), buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------- reading
_GLOBAL_PATTERN = re.compile(r"GLOBAL ([\w.]+)")


def _refusal(path: Path, err: BaseException) -> UnsafeFileError:
    named = sorted(set(_GLOBAL_PATTERN.findall(str(err))))
    what = ", ".join(named) if named else "a Python object that is not a tensor or plain data"
    return UnsafeFileError(
        f"{path}: refused: loading it would need arbitrary unpickling ({what}), which can run any code; "
        "bnao reads only tensors and plain Python (torch.load weights_only=True). Use a file written by bnao, "
        "or, if you wrote it yourself with an older bnao and trust it, convert it once with "
        f"`python -m bnao.safe_io --trust {path}`"
    )


def safe_load(path: PathLike, map_location: Optional[Union[str, torch.device]] = "cpu") -> Any:
    """Loads a file with ``weights_only=True`` and decodes its NumPy values.

    Args:
        path: The file.
        map_location: Where tensors are loaded.

    Returns:
        The stored object.

    Raises:
        UnsafeFileError: Loading it would need arbitrary unpickling; nothing of it was run.
        DamagedFileError: The file is missing, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path}: no such file")
    try:
        data = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe unpickler names a callable it refuses as "Unsupported global: GLOBAL module.name";
        # any other unpickling failure (bad opcode, truncated stream) means a damaged file.
        if _GLOBAL_PATTERN.search(str(err)) or "unsupported global" in str(err).lower():
            raise _refusal(path, err) from None
        raise _damaged(path, err) from None
    except Exception as err:  # noqa: BLE001 - zip, EOF and parse errors all mean "damaged"
        raise _damaged(path, err) from None
    return decode(data)


def _damaged(path: Path, err: BaseException) -> DamagedFileError:
    """The error for a file torch cannot parse: damaged, or not a file bnao (or torch.save) wrote."""
    detail = _first_line(err)
    # torch's weights-only failures advise re-running torch.load with weights_only=False, which would run
    # whatever the file holds; that advice must not reach the user, so only the error's kind is kept.
    cause = type(err).__name__ if "weights_only" in detail or "weights only" in detail.lower() else (
        f"{type(err).__name__}: {detail[:200]}")
    return DamagedFileError(f"{path} is corrupt or truncated, or not a file bnao wrote: it is not a readable "
                            f"checkpoint ({cause})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------- writing
_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space within your disk quota",
    errno.EACCES: "make the folder writable",
    errno.EPERM: "make the folder writable",
    errno.EROFS: "choose a run directory on a writable file system",
}


def write_error(path: Path, err: OSError) -> FileWriteError:
    """The :class:`FileWriteError` for a failed write of ``path``: cause, what is intact, the fix."""
    cause = err.strerror or str(err) or type(err).__name__
    fix = _FIXES.get(err.errno, "fix the cause")
    return FileWriteError(f"cannot write {path}: {cause}; the previous {path.name} is intact. "
                          f"{fix[0].upper() + fix[1:]}, then run the command again")


def _fsync_folder(folder: Path) -> None:
    # Persist the rename itself (the directory entry); not every platform allows opening a directory.
    try:
        dir_fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Makes ``previous`` the current ``path`` while ``path`` stays in place (a hard link, no copy)."""
    if not path.exists():
        return
    link = previous.with_name(f".{previous.name}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        # No hard links here (some network file systems): move it; until the new file is
        # renamed in, a reader finds only `previous`, which load_checkpoint falls back to.
        os.replace(path, previous)
        return
    os.replace(link, previous)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], previous: Optional[PathLike]) -> None:
    """Temp file in the destination's folder, ``write(handle)``, fsync, keep ``previous``, rename over ``path``."""
    tmp: Optional[str] = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if previous is not None:
            _keep_as_previous(path, Path(previous))
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_folder(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, previous: Optional[PathLike] = None) -> None:
    """Writes ``data`` to ``path`` so that a crash or a failed write never leaves a torn or lost file.

    Args:
        path: Destination; its folder must exist.
        data: The new content.
        previous: When given, the current ``path`` (if any) becomes this file once the
            new content is safely on disk, so the last two versions are kept.

    Raises:
        FileWriteError: The write failed (disk full, permission, ...); the existing files are unchanged.
    """
    _atomic_write(Path(path), lambda fh: fh.write(data), previous)


def atomic_write_lines(path: PathLike, lines: Iterable[str]) -> None:
    """Writes text lines (each with its newline) like :func:`atomic_write_bytes`, streamed, not held in memory.

    Raises:
        FileWriteError: The write failed; the existing file is unchanged.
    """

    def write(fh: BinaryIO) -> None:
        chunk: List[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= 4096:
                fh.write("".join(chunk).encode())
                chunk.clear()
        fh.write("".join(chunk).encode())

    _atomic_write(Path(path), write, None)


def save_figure(figure: Any, path: PathLike, dpi: int = 120) -> None:
    """Saves a matplotlib figure as PNG through :func:`atomic_write_bytes` (a failed write keeps the old plot)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def save_atomic(obj: Any, path: PathLike, previous: Optional[PathLike] = None) -> None:
    """Saves ``obj`` (NumPy values encoded) with :func:`torch.save` through :func:`atomic_write_bytes`."""
    # Serialise to memory first: a failure while pickling then cannot leave even a temp file behind.
    atomic_write_bytes(path, dumps(obj), previous)


def trust_and_convert(path: PathLike) -> None:
    """Rewrites a file that an older bnao wrote (raw NumPy pickles) in the safe format.

    Only for files the user wrote and trusts: this one load is a full unpickle.
    """
    path = Path(path)
    data = torch.load(str(path), map_location="cpu", weights_only=False)
    save_atomic(data, path)


def main(argv=None) -> int:
    """``python -m bnao.safe_io --trust FILE...``: convert trusted old files to the safe format."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bnao.safe_io", description=trust_and_convert.__doc__)
    parser.add_argument("--trust", nargs="+", required=True, metavar="FILE", help="files you wrote and trust")
    args = parser.parse_args(argv)
    for name in args.trust:
        try:
            trust_and_convert(name)
        except (OSError, RuntimeError, pickle.UnpicklingError, FileWriteError) as err:
            print(f"python -m bnao.safe_io: error: {name}: {err}", file=sys.stderr)
            return 1
        print(f"{name}: converted; bnao now loads it with weights_only=True")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
