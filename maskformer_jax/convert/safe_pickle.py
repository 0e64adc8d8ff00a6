"""Load checkpoint weights from pickles without executing code from the file.

Two formats are supported, both read into a flat ``{name: np.ndarray}`` dict:

* :func:`load_detectron2_pickle` -- the official Detectron2 / MaskFormer model
  zoo ``.pkl`` files: a pickle of ``{"model": {name: ndarray}, "__author__":
  ..., "matching_heuristics": ...}`` (or directly a flat ``{name: ndarray}``).
* :func:`load_torch_state_dict` -- a ``torch.save`` zip checkpoint (e.g.
  transformers' ``pytorch_model.bin``), read **without importing torch**.

Safety: ``pickle`` can call any importable callable while loading.  Both
loaders use :class:`_RestrictedUnpickler`, whose ``find_class`` only returns
objects from an explicit whitelist (numpy's array reconstructors for
Detectron2 pickles; our own small numpy re-implementations of torch's tensor
rebuild functions for torch checkpoints).  Any other global -- ``os.system``,
``builtins.eval``, a custom class -- raises :class:`UnsafeCheckpointError`
before it is ever imported or called.  Pickle opcodes that construct objects
(REDUCE, BUILD, NEWOBJ, ...) can only act on objects that came out of
``find_class`` or on plain builtin containers, so the whitelist bounds what
the file can make the interpreter do.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "load_detectron2_pickle",
    "load_torch_state_dict",
]

_OFFICIAL_CONTENT = ("Official Detectron2/MaskFormer and PyTorch checkpoints contain only numpy "
                     "arrays / torch tensors inside plain containers (dict, list, tuple, "
                     "OrderedDict)")


class UnsafeCheckpointError(ValueError):
  """A checkpoint pickle references a global outside the loader's whitelist.

  Loading stopped *before* the global was imported or called.
  """


class CheckpointFormatError(ValueError):
  """A checkpoint file is not in the expected format (corrupt, truncated,
  wrong kind of file, unexpected structure or value types)."""


# --------------------------------------------------------------------------
# Restricted unpickler (shared by both loaders).
# --------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
  """``pickle.Unpickler`` whose ``find_class`` only admits a whitelist.

  Args:
    file: binary file object positioned at the start of the pickle.
    whitelist: ``{(module, qualname): object}``; ``find_class(module, name)``
      returns the mapped object (which need not be the real one -- the torch
      loader maps torch names to its own numpy functions).
    path: file name used in error messages.

  Python-2 era names (``__builtin__.set``, ...) are translated with the same
  table the stdlib's default ``find_class`` uses (``fix_imports``), because
  overriding ``find_class`` bypasses that translation.
  """

  def __init__(self, file: BinaryIO, *, whitelist: Mapping[tuple[str, str], Any], path: str):
    # latin1: Python-2 pickles store numpy array bytes as py2 `str`.
    super().__init__(file, encoding="latin1")
    self._whitelist = whitelist
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    default = (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    py3 = _compat_pickle.NAME_MAPPING.get((module, name), default)
    for key in ((module, name), py3):
      if key in self._whitelist:
        return self._whitelist[key]
    alias = f" (Python 3: '{py3[0]}.{py3[1]}')" if py3 != (module, name) else ""
    raise UnsafeCheckpointError(
        f"{self._path}: refusing to load global '{module}.{name}'{alias} referenced by the pickle; "
        f"it is not in the whitelist of this loader and loading it could execute arbitrary "
        f"code. {_OFFICIAL_CONTENT}, so this file is either not an official checkpoint or "
        f"has been tampered with. Re-download it from the official source (or, if you trust "
        f"it, re-export it as a plain {{name: numpy array}} dict).")

  def persistent_load(self, pid: Any) -> Any:
    raise CheckpointFormatError(
        f"{self._path}: the pickle contains a persistent reference ({pid!r:.80}) to data stored "
        f"outside the pickle stream; plain Detectron2 .pkl checkpoints never do. If this is a "
        f"torch.save file, use load_torch_state_dict.")


def _unpickle(unpickler: _RestrictedUnpickler, path: str) -> Any:
  """Run ``unpickler.load()``, turning low-level failures into clear errors."""
  try:
    return unpickler.load()
  except UnsafeCheckpointError:
    raise
  except CheckpointFormatError as e:
    if str(e).startswith(path):
      raise
    raise CheckpointFormatError(f"{path}: {e}") from e
  except Exception as e:  # corrupt data surfaces as many different types
    raise CheckpointFormatError(f"{path}: could not unpickle the checkpoint ({type(e).__name__}: {e}). The file is not "
                                f"a pickle, or it is truncated or corrupt (an interrupted download?). Re-download it "
                                f"and compare its size / checksum with the published one.") from e


def _check_exists(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: checkpoint file not found. Check the path (cwd is {os.getcwd()!r}) or "
                            f"download the checkpoint first.")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path}: is a directory; pass the checkpoint file itself.")


def _to_state_dict(obj: Any, path: str, *, container_keys: tuple[str, ...],
                   allow_numbers: bool) -> dict[str, np.ndarray]:
  """Pick the parameter dict out of an unpickled checkpoint and validate it.

  If ``obj`` is a dict with a ``container_keys`` entry holding a dict, that
  entry is used; otherwise ``obj`` itself must be the flat parameter dict.
  Every value must be a numeric ndarray (or, when ``allow_numbers``, a plain
  Python/numpy number or list of numbers, converted with ``np.asarray``).
  """
  expected = "a flat {parameter name: array} dict, or a dict with such a dict under " + " / ".join(
      repr(k) for k in container_keys)
  if not isinstance(obj, dict):
    raise CheckpointFormatError(f"{path}: the pickle holds a {type(obj).__name__}; expected {expected}.")
  where = "the top-level dict"
  for key in container_keys:
    if isinstance(obj.get(key), dict):
      obj, where = obj[key], f"the {key!r} dict"
      break
  out: dict[str, np.ndarray] = {}
  for name, value in obj.items():
    array = None
    if isinstance(value, np.ndarray):
      array = value
    elif allow_numbers and isinstance(value, (int, float, list, tuple, np.generic)):
      try:
        array = np.asarray(value)
      except ValueError:  # ragged lists
        array = None
    if array is None or array.dtype.kind not in "biufc" or not isinstance(name, str):
      what = f"a {type(value).__name__}" + (f" of dtype {array.dtype}" if array is not None else "")
      raise CheckpointFormatError(
          f"{path}: entry {name!r} of {where} is {what}, not a numeric array. Expected {expected}; "
          f"keys of {where}: {list(obj)[:8]}{' ...' if len(obj) > 8 else ''}.")
    out[name] = array
  return out


# --------------------------------------------------------------------------
# Detectron2 .pkl
# --------------------------------------------------------------------------


def _latin1_encode(obj: str, encoding: str = "utf-8") -> bytes:
  """Stand-in for ``_codecs.encode``: protocol<3 pickles store ``bytes`` as
  ``_codecs.encode(text, "latin1")``; only that use is admitted."""
  if not isinstance(obj, str) or encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
    raise CheckpointFormatError(f"unexpected _codecs.encode({type(obj).__name__}, {encoding!r}) in pickle")
  return obj.encode("latin1")


def _d2_whitelist() -> dict[tuple[str, str], Any]:
  """Globals a pickled numpy array may reference (numpy 1.x and 2.x names)."""
  reconstruct = np.ndarray(0).__reduce__()[0]  # numpy[._]core.multiarray._reconstruct
  scalar = np.float64(0).__reduce__()[0]  # numpy[._]core.multiarray.scalar
  frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy[._]core.numeric._frombuffer (protocol 5)
  allowed: dict[tuple[str, str], Any] = {
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "bytearray"): bytearray,
      ("_codecs", "encode"): _latin1_encode,
  }
  for core in ("numpy.core", "numpy._core"):
    allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
    allowed[(f"{core}.multiarray", "scalar")] = scalar
    allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
  return allowed


_ZIP_MAGIC = b"PK\x03\x04"


def load_detectron2_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read an official Detectron2 / MaskFormer ``.pkl`` checkpoint safely.

  Args:
    path: a pickle of ``{"model": {name: ndarray, ...}, ...}`` (other
      top-level entries such as ``"__author__"`` or ``"matching_heuristics"``
      are ignored) or directly of a flat ``{name: ndarray}`` dict.  Python-2
      era pickles (protocol 2, latin1 strings) are supported.

  Returns:
    ``{parameter name: np.ndarray}`` in file order.  Arrays keep the dtype
    and shape stored in the file (D2 zoo files are mostly float32 and
    sometimes float64 / int64); plain Python numbers or lists of numbers
    found in ``"model"`` are converted with ``np.asarray``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    UnsafeCheckpointError: the pickle references a global other than numpy
      array/dtype/scalar reconstructors and ``collections.OrderedDict``.
    CheckpointFormatError: not a pickle, truncated/corrupt, a torch zip, no
      ``"model"`` dict, or a non-numeric entry.
  """
  path = os.fspath(path)
  _check_exists(path)
  with open(path, "rb") as f:
    if f.read(4) == _ZIP_MAGIC:
      raise CheckpointFormatError(f"{path}: this is a zip archive (a torch.save checkpoint, e.g. a Detectron2 "
                                  f"'model_final.pth'), not a plain pickle. Use load_torch_state_dict instead.")
    f.seek(0)
    obj = _unpickle(_RestrictedUnpickler(f, whitelist=_d2_whitelist(), path=path), path)
  return _to_state_dict(obj, path, container_keys=("model",), allow_numbers=True)


# --------------------------------------------------------------------------
# torch.save zip checkpoints, read without torch.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  """Stand-in for a ``torch.dtype`` (e.g. ``torch.float16``)."""

  name: str  # torch name, e.g. "bfloat16"
  numpy: str  # numpy / ml_dtypes dtype name used to view the raw bytes
  to_float32: bool = False  # ml_dtypes types are upcast for the caller


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co. (``dtype=None``: untyped bytes)."""

  name: str
  dtype: _TorchDtype | None


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage read from ``<prefix>/data/<key>``: raw bytes + element dtype."""

  key: str
  raw: bytes
  dtype: _TorchDtype | None


# torch dtype name -> numpy view; aliases share entries.
_TORCH_DTYPES: dict[str, _TorchDtype] = {}
for _names, _np_name, _upcast in [
    (("float64", "double"), "float64", False),
    (("float32", "float"), "float32", False),
    (("float16", "half"), "float16", False),
    (("bfloat16",), "bfloat16", True),
    (("float8_e4m3fn",), "float8_e4m3fn", True),
    (("float8_e5m2",), "float8_e5m2", True),
    (("complex128", "cdouble"), "complex128", False),
    (("complex64", "cfloat"), "complex64", False),
    (("int64", "long"), "int64", False),
    (("int32", "int"), "int32", False),
    (("int16", "short"), "int16", False),
    (("int8",), "int8", False),
    (("uint64",), "uint64", False),
    (("uint32",), "uint32", False),
    (("uint16",), "uint16", False),
    (("uint8",), "uint8", False),
    (("bool",), "bool", False),
]:
  for _n in _names:
    _TORCH_DTYPES[_n] = _TorchDtype(_names[0], _np_name, _upcast)

# Legacy typed storage classes that torch.save still writes for tensors.
_TORCH_STORAGES: dict[str, _StorageType] = {
    f"{prefix}Storage": _StorageType(f"{prefix}Storage", _TORCH_DTYPES[dtype]) for prefix, dtype in [
        ("Double", "float64"),
        ("Float", "float32"),
        ("Half", "float16"),
        ("BFloat16", "bfloat16"),
        ("ComplexDouble", "complex128"),
        ("ComplexFloat", "complex64"),
        ("Long", "int64"),
        ("Int", "int32"),
        ("Short", "int16"),
        ("Char", "int8"),
        ("Byte", "uint8"),
        ("Bool", "bool"),
    ]
}  # fmt: skip
_UNTYPED_STORAGE = _StorageType("UntypedStorage", None)


def _numpy_dtype(dtype: _TorchDtype) -> np.dtype:
  if dtype.to_float32:
    try:
      import ml_dtypes
    except ImportError as e:
      raise ImportError(
          f"reading torch.{dtype.name} tensors needs the 'ml_dtypes' package: pip install ml_dtypes") from e
    return np.dtype(getattr(ml_dtypes, dtype.numpy))
  return np.dtype(dtype.numpy)


def _tensor_from_storage(storage: Any,
                         offset: Any,
                         size: Any,
                         stride: Any,
                         dtype: _TorchDtype | None,
                         metadata: Any = None) -> np.ndarray:
  """numpy version of ``torch._utils._rebuild_tensor``: a C-contiguous copy
  of ``storage`` viewed with element ``offset``, ``size`` and ``stride``."""
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f"tensor rebuild got a {type(storage).__name__} instead of a storage")
  dtype = dtype or storage.dtype
  if dtype is None:
    raise CheckpointFormatError(f"storage {storage.key!r} is untyped and the tensor has no dtype")
  geometry_ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
  ints = (offset, *size, *stride) if geometry_ok else ()
  if not geometry_ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
    raise CheckpointFormatError(f"invalid tensor geometry offset={offset!r} size={size!r} stride={stride!r}")
  np_dtype = _numpy_dtype(dtype)
  if len(storage.raw) % np_dtype.itemsize:
    raise CheckpointFormatError(
        f"storage {storage.key!r} has {len(storage.raw)} bytes, not a multiple of {dtype.name}'s size")
  flat = np.frombuffer(storage.raw, dtype=np_dtype)
  if 0 in size:
    array = np.empty(size, np_dtype)
  else:
    # Bounds check before as_strided, which would otherwise read past the buffer.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
      raise CheckpointFormatError(
          f"tensor (offset={offset}, size={tuple(size)}, stride={tuple(stride)}) reaches element "
          f"{last} but storage {storage.key!r} holds only {flat.size} {dtype.name} elements (truncated file?)")
    view = np.lib.stride_tricks.as_strided(flat[offset:],
                                           shape=tuple(size),
                                           strides=tuple(s * np_dtype.itemsize for s in stride),
                                           writeable=False)
    array = np.array(view, order="C", copy=True)
  if dtype.to_float32:
    array = array.astype(np.float32)
  for flag, value in (metadata or {}).items():  # lazy conj / neg views
    if flag == "conj" and value:
      array = np.conj(array)
    elif flag == "neg" and value:
      array = np.negative(array)
    elif value:
      raise CheckpointFormatError(f"unsupported tensor metadata {flag!r}={value!r}")
  return array


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
  """``torch._utils._rebuild_tensor_v2`` -> np.ndarray (dtype from the storage)."""
  return _tensor_from_storage(storage, offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  """``torch._utils._rebuild_tensor_v3`` (dtypes without a legacy storage
  class, e.g. uint16) -> np.ndarray."""
  if not isinstance(dtype, _TorchDtype):
    raise CheckpointFormatError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
  return _tensor_from_storage(storage, offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  """``torch._utils._rebuild_parameter[_with_state]``: a Parameter is just
  its data here; python attributes in ``state`` are dropped."""
  return data


_TORCH_WHITELIST: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _UNTYPED_STORAGE,
    ("torch", "UntypedStorage"): _UNTYPED_STORAGE,
    **{
        ("torch", name): st for name, st in _TORCH_STORAGES.items()
    },
    **{
        ("torch", name): dt for name, dt in _TORCH_DTYPES.items()
    },
}


class _TorchUnpickler(_RestrictedUnpickler):
  """Restricted unpickler for ``<prefix>/data.pkl``; storages are loaded
  from ``<prefix>/data/<key>`` in the same zip (shared between tensors)."""

  def __init__(self, file: BinaryIO, *, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file, whitelist=_TORCH_WHITELIST, path=path)
    self._archive, self._prefix = archive, prefix
    self._storages: dict[str, _Storage] = {}

  def persistent_load(self, pid: Any) -> _Storage:
    # torch writes ("storage", storage_type, key, location, numel).
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise CheckpointFormatError(f"{self._path}: unexpected persistent id {pid!r:.100} in data.pkl")
    _, storage_type, key, _location, _numel = pid
    key = str(key)
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise CheckpointFormatError(
            f"{self._path}: storage record {name!r} is missing from the zip (truncated or corrupt file?)") from None
      self._storages[key] = _Storage(key, raw, storage_type.dtype)
    return self._storages[key]


def _is_legacy_torch_file(path: str) -> bool:
  magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch's pre-1.6 header
  with open(path, "rb") as f:
    return f.read(len(magic)) == magic


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a ``torch.save`` zip checkpoint into numpy without importing torch.

  Args:
    path: a file written by ``torch.save`` (torch >= 1.6 zip format) holding
      a flat ``{name: tensor}`` state dict, e.g. ``pytorch_model.bin``.  A
      dict whose ``"model"`` or ``"state_dict"`` entry is such a dict (e.g.
      Detectron2's ``model_final.pth``) is unwrapped.

  Returns:
    ``{name: np.ndarray}`` in file order; every array is a C-contiguous copy
    with the tensor's shape.  dtypes match ``tensor.numpy()`` (float32,
    float16, float64, int64, int32, int16, int8, uint8, bool, complex,
    uint16/32/64), except bfloat16 and float8 tensors, which are returned as
    float32 (exact upcast).  ``nn.Parameter`` entries load as their data;
    non-contiguous views, storage offsets and shared storages are honoured.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    UnsafeCheckpointError: ``data.pkl`` references any global besides the
      tensor/parameter rebuild functions, storage classes, dtypes and
      ``collections.OrderedDict``.
    CheckpointFormatError: legacy (non-zip) torch file, not a torch zip,
      corrupt/truncated data, big-endian data, or a non-tensor entry.
  """
  path = os.fspath(path)
  _check_exists(path)
  if not zipfile.is_zipfile(path):
    if _is_legacy_torch_file(path):
      raise CheckpointFormatError(
          f"{path}: this is a legacy (pre-1.6, non-zip) torch.save file, which this loader does "
          f"not read. Re-save it with a recent torch: "
          f"torch.save(torch.load(old_path, map_location='cpu'), new_path).")
    raise CheckpointFormatError(f"{path}: not a torch.save zip checkpoint (not a zip archive; truncated download?). "
                                f"For a Detectron2 .pkl checkpoint use load_detectron2_pickle.")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise CheckpointFormatError(
            f"{path}: expected exactly one '<prefix>/data.pkl' record in the zip, found {pickles}; "
            f"this zip was not written by torch.save (an .npz or other archive?).")
      prefix = pickles[0][:-len("data.pkl")]
      has_byteorder = f"{prefix}byteorder" in archive.namelist()
      byteorder = archive.read(f"{prefix}byteorder").decode() if has_byteorder else "little"
      if byteorder != "little":
        raise CheckpointFormatError(
            f"{path}: tensors are stored {byteorder}-endian, which is not supported; re-save the "
            f"checkpoint with torch on a little-endian machine.")
      with archive.open(pickles[0]) as f:
        unpickler = _TorchUnpickler(f, archive=archive, prefix=prefix, path=path)
        obj = _unpickle(unpickler, path)
  except zipfile.BadZipFile as e:
    raise CheckpointFormatError(f"{path}: corrupt zip archive ({e}); re-download or re-save the checkpoint.") from e
  return _to_state_dict(obj, path, container_keys=("model", "state_dict"), allow_numbers=False)
