"""Readers for the file formats real datasets ship in, with nothing that can run code on load.

* Python pickles of numpy arrays (the CIFAR-10 "python version"): :func:`load_numpy_pickle` uses a
  restricted unpickler that rebuilds ndarrays, dtypes and plain containers only; any other global
  (``os.system``, ``builtins.eval``, a class of any module) is refused before it is looked up.
* IDX files (MNIST and its relatives), gzipped or not: :func:`read_idx`.
* UTF-8 text as character token ids: :func:`read_text`, :func:`encode_characters` and
  :func:`text_windows`.

Every reader raises :class:`FormatError` (naming the file) for a missing, truncated or malformed
file; callers turn it into a :class:`~ranger_ps.errors.UserError` with the dataset spec in front.
"""

from __future__ import annotations

import gzip
import importlib
import math
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class FormatError(ValueError):
    """A file that is missing, unreadable or not in the expected format (the message names it)."""


# --- restricted pickles --------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for ``bytes``: latin-1 only."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The globals a pickled ndarray needs, under their numpy 1 and numpy 2 module names.

    ``_reconstruct`` (protocols 0-4), ``_frombuffer`` (protocol 5), ``scalar`` (numpy scalars such as
    an ``np.int64`` label), and the ``ndarray`` and ``dtype`` types. The objects come from whichever
    of ``numpy._core`` (numpy 2) or ``numpy.core`` (numpy 1) this numpy has, so loading a numpy 1
    pickle under numpy 2 never touches the deprecated ``numpy.core`` alias.
    """
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain Python data, and refuses every other global.

    Plain containers, numbers, strings and bytes need no globals at all; the only globals resolved are
    those in :func:`_numpy_globals` (numpy's own array and dtype constructors, which run no user
    code). Anything else raises :class:`pickle.UnpicklingError` before the name is even imported.
    """

    _allowed: dict[tuple[str, str], Callable[..., Any]] | None = None

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only if it is one of the allowed numpy globals."""
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays and plain data are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Persistent ids are never valid in a data file."""
        raise pickle.UnpicklingError("refusing a persistent id: only numpy arrays and plain data are allowed")


def load_numpy_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"`` for Python 2 files).

    Raises:
        FormatError: the file is missing, truncated, corrupt, or asks for a global that is not allowed.
    """
    try:
        with path.open("rb") as file:
            return RestrictedUnpickler(file, encoding="bytes").load()
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    except pickle.UnpicklingError as exc:
        raise FormatError(f"{path} is not a safe numpy pickle: {exc}") from None
    except EOFError:
        raise FormatError(f"{path} is truncated (the pickle ends early)") from None
    except Exception as exc:  # a corrupt stream fails in many ways (ValueError, TypeError, struct.error ...)
        raise FormatError(f"{path} is not a valid pickle: {type(exc).__name__}: {exc}") from None


# --- IDX -----------------------------------------------------------------------------------------

IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""The IDX type codes (third byte of the magic number) and their big-endian numpy dtypes."""

_GZIP_MAGIC = b"\x1f\x8b"


def read_file_bytes(path: Path) -> bytes:
    """The contents of ``path``, decompressed if it is gzipped (detected by its magic, not its name).

    Raises:
        FormatError: the file is missing or unreadable, or its gzip stream is truncated or corrupt.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise FormatError(f"{path} is truncated (the gzip stream ends early)") from None
    except (OSError, zlib.error) as exc:
        raise FormatError(f"{path} is not a valid gzip file: {exc}") from None


def parse_idx(raw: bytes, source: str) -> np.ndarray[Any, Any]:
    """Parse the bytes of an IDX file into an array in native byte order.

    The header is two zero bytes, a type code (:data:`IDX_DTYPES`), the number of dimensions, then
    each dimension as a big-endian ``uint32``; the data follows, big-endian, row-major, and must fill
    the rest of the file exactly.

    Args:
        raw: the file's (decompressed) bytes.
        source: what to call the file in error messages.

    Raises:
        FormatError: a bad magic number, an unknown type code, or a size that does not match the header.
    """
    if len(raw) < 4:
        raise FormatError(f"{source} is truncated (no IDX header)")
    if raw[0] != 0 or raw[1] != 0:
        raise FormatError(f"{source} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise FormatError(f"{source} has unknown IDX type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise FormatError(f"{source} declares no dimensions")
    if len(raw) < header:
        raise FormatError(f"{source} is truncated (the IDX header declares {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header
    if actual < expected:
        raise FormatError(f"{source} is truncated: {actual} data bytes, the header {shape} needs {expected}")
    if actual > expected:
        raise FormatError(f"{source} has {actual - expected} bytes after the data the header {shape} describes")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a native-order, writable copy


def read_idx(path: Path) -> np.ndarray[Any, Any]:
    """Read an IDX file (gzipped or not) into a native-order numpy array; see :func:`parse_idx`."""
    return parse_idx(read_file_bytes(path), str(path))


# --- text ----------------------------------------------------------------------------------------

_UNICODE_SIZE = 0x110000


def read_text(path: Path) -> str:
    """The contents of a UTF-8 text file (a leading byte-order mark is dropped).

    Raises:
        FormatError: the file is missing or unreadable, or not valid UTF-8.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def encode_characters(text: str) -> tuple[torch.Tensor, str]:
    """Character token ids for ``text`` and its vocabulary.

    The vocabulary is the sorted distinct characters of ``text`` (sorted by code point, as Python
    sorts strings); a character's token id is its index in it. Vectorized: the text is viewed as
    UTF-32 code points and mapped through a lookup table over all of Unicode (linear time).

    Returns:
        ``(ids, vocabulary)``: ``ids`` is int64 of shape ``(len(text),)``.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    present = np.zeros(_UNICODE_SIZE, dtype=bool)
    present[codes] = True
    distinct = np.flatnonzero(present)
    token_of = np.zeros(_UNICODE_SIZE, dtype=np.int64)
    token_of[distinct] = np.arange(len(distinct), dtype=np.int64)
    vocabulary = "".join(chr(int(code)) for code in distinct)  # one step per distinct character
    return torch.from_numpy(token_of[codes]), vocabulary


def text_windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token sequence into non-overlapping windows with next-token targets.

    Window ``i`` is ``x[i] = ids[i*context : (i+1)*context]`` and ``y[i]`` the same span shifted by
    one token, so every token after the first is a target exactly once and consecutive windows touch
    (the last target of one window is the first input of the next). Tokens that do not fill a whole
    window at the end are dropped. ``x`` and ``y`` are views of ``ids`` (no copy).

    Returns:
        ``(x, y)``, each of shape ``(n, context)`` with ``n = (len(ids) - 1) // context``.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be one-dimensional, not {tuple(ids.shape)}")
    n = max(0, (len(ids) - 1) // context)
    x = ids[: n * context].view(n, context)
    y = ids[1 : n * context + 1].view(n, context)
    return x, y
