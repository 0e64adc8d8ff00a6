"""Tests for maskformer_jax.convert.safe_pickle (no code execution on load)."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from maskformer_jax.convert.safe_pickle import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_detectron2_pickle,
    load_torch_state_dict,
)


def _d2_model() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
      "b": rng.standard_normal(5),  # float64
      "c": rng.integers(-100, 100, size=(2, 3), dtype=np.int64),
  }


def _assert_same(got: dict, want: dict) -> None:
  assert list(got) == list(want)
  for k in want:
    assert isinstance(got[k], np.ndarray)
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k])


# ----------------------------------------------------------------- Detectron2


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_d2_pickle_roundtrip(tmp_path, protocol):
  model = _d2_model()
  path = tmp_path / "model.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": model, "__author__": "x", "matching_heuristics": True}, f, protocol=protocol)
  _assert_same(load_detectron2_pickle(path), model)


@pytest.mark.parametrize("protocol", [2, 5])
def test_d2_ordered_dict_and_python_numbers(tmp_path, protocol):
  model = collections.OrderedDict(w=np.ones((2, 2), np.float32), n=3, s=np.float32(1.5), lst=[1.0, 2.0])
  path = tmp_path / "model.pkl"
  path.write_bytes(pickle.dumps({"model": model, "extra": {1, 2}}, protocol=protocol))
  got = load_detectron2_pickle(str(path))
  np.testing.assert_array_equal(got["w"], model["w"])
  assert got["n"] == 3 and got["n"].shape == ()
  assert got["s"].dtype == np.float32 and got["s"] == 1.5
  np.testing.assert_array_equal(got["lst"], [1.0, 2.0])


def test_flat_dict_pickle(tmp_path):
  model = _d2_model()
  path = tmp_path / "flat.pkl"
  path.write_bytes(pickle.dumps(model, protocol=2))
  _assert_same(load_detectron2_pickle(path), model)


def test_d2_python2_era_pickle(tmp_path):
  """Hand-written protocol-2 pickle as Python 2 wrote it: py2 `str` (SHORT_BINSTRING)
  for keys and raw array bytes, and the pre-numpy-2 `numpy.core` module names."""
  raw = np.array([1.5, -2.0], dtype="<f4").tobytes()
  dtype = b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
  array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R" + b"(K\x01K\x02\x85" + dtype +
           b"\x89U\x08" + raw + b"tb")
  data = b"\x80\x02}(U\x05model}(U\x01w" + array + b"uU\x0a__author__U\x03fooU\x05extrac__builtin__\nset\n)Ru."
  path = tmp_path / "py2.pkl"
  path.write_bytes(data)
  got = load_detectron2_pickle(path)
  assert list(got) == ["w"] and got["w"].dtype == np.float32
  np.testing.assert_array_equal(got["w"], [1.5, -2.0])


class _SystemPayload:

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"echo pwned > {self.target}",))


class _EvalPayload:

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (eval, (f"open({str(self.target)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload, global_name", [(_SystemPayload, "system"), (_EvalPayload, "builtins.eval")])
@pytest.mark.parametrize("protocol", [2, 4])
def test_d2_refuses_callables(tmp_path, payload, global_name, protocol):
  target = tmp_path / "pwned.txt"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2), "x": payload(target)}}, protocol=protocol))
  with pytest.raises(UnsafeCheckpointError) as exc:
    load_detectron2_pickle(path)
  msg = str(exc.value)
  assert global_name in msg and str(path) in msg and "numpy arrays" in msg
  assert not target.exists()


def test_d2_refuses_custom_class(tmp_path):
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"model": {"x": collections.Counter("ab")}}, protocol=4))
  with pytest.raises(UnsafeCheckpointError, match="collections.Counter"):
    load_detectron2_pickle(path)


def test_d2_missing_file(tmp_path):
  path = tmp_path / "nope.pkl"
  with pytest.raises(FileNotFoundError, match="not found") as exc:
    load_detectron2_pickle(path)
  assert str(path) in str(exc.value)


def test_d2_garbage_and_truncated(tmp_path):
  garbage = tmp_path / "garbage.pkl"
  garbage.write_bytes(b"this is definitely not a pickle")
  with pytest.raises(CheckpointFormatError, match="not a pickle, or it is truncated or corrupt") as exc:
    load_detectron2_pickle(garbage)
  assert str(garbage) in str(exc.value)

  data = pickle.dumps({"model": _d2_model()}, protocol=2)
  for cut in (len(data) // 2, len(data) - 1, 1):
    truncated = tmp_path / f"trunc{cut}.pkl"
    truncated.write_bytes(data[:cut])
    with pytest.raises(CheckpointFormatError, match="truncated"):
      load_detectron2_pickle(truncated)

  empty = tmp_path / "empty.pkl"
  empty.write_bytes(b"")
  with pytest.raises(CheckpointFormatError, match="truncated"):
    load_detectron2_pickle(empty)


def test_d2_bad_structure(tmp_path):
  path = tmp_path / "list.pkl"
  path.write_bytes(pickle.dumps([1, 2, 3]))
  with pytest.raises(CheckpointFormatError, match="holds a list"):
    load_detectron2_pickle(path)

  path = tmp_path / "nomodel.pkl"
  path.write_bytes(pickle.dumps({"__author__": "x", "w": np.zeros(2)}))
  with pytest.raises(CheckpointFormatError, match="entry '__author__'.*'model'"):
    load_detectron2_pickle(path)

  path = tmp_path / "str.pkl"
  path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2), "name": "resnet"}}))
  with pytest.raises(CheckpointFormatError, match="entry 'name' of the 'model' dict is a str"):
    load_detectron2_pickle(path)

  path = tmp_path / "nested.pkl"
  path.write_bytes(pickle.dumps({"model": {"sub": {"w": np.zeros(2)}}}))
  with pytest.raises(CheckpointFormatError, match="entry 'sub'.*is a dict"):
    load_detectron2_pickle(path)

  path = tmp_path / "objarr.pkl"
  path.write_bytes(pickle.dumps({"model": {"o": np.array([1, "a"], dtype=object)}}))
  with pytest.raises(CheckpointFormatError, match="dtype object"):
    load_detectron2_pickle(path)


# ---------------------------------------------------------------------- torch


def _torch_state_dict():
  gen = torch.Generator().manual_seed(0)
  big = torch.randn(10, 6, generator=gen)
  shared = torch.randn(4, 5, generator=gen)
  sd = collections.OrderedDict()
  sd["f32"] = torch.randn(3, 4, generator=gen)
  sd["f16"] = torch.randn(2, 3, generator=gen).half()
  sd["bf16"] = torch.randn(7, generator=gen).bfloat16()
  sd["f64"] = torch.randn(2, generator=gen).double()
  sd["i64"] = torch.randint(-1000, 1000, (5,), generator=gen)
  sd["i32"] = torch.randint(-1000, 1000, (2, 2), generator=gen).int()
  sd["u8"] = torch.randint(0, 255, (3,), generator=gen).to(torch.uint8)
  sd["bool"] = torch.tensor([True, False, True])
  sd["transposed"] = torch.randn(3, 5, generator=gen).t()
  sd["offset_slice"] = big[2:5, 1:4]
  sd["scalar"] = torch.tensor(3.25)
  sd["empty"] = torch.zeros(0, 3)
  sd["param"] = torch.nn.Parameter(torch.randn(4, generator=gen))
  sd["shared_a"] = shared
  sd["shared_b"] = shared[1:3].t()
  sd["u16_v3"] = torch.tensor([1, 2, 60000]).to(torch.uint16)
  return sd


def _expected_numpy(t):
  t = t.detach()
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_torch_state_dict_roundtrip(tmp_path):
  sd = _torch_state_dict()
  path = tmp_path / "pytorch_model.bin"
  torch.save(sd, path)
  got = load_torch_state_dict(path)
  assert list(got) == list(sd)
  for k, t in sd.items():
    want = _expected_numpy(t)
    assert got[k].dtype == want.dtype, k
    assert got[k].shape == want.shape, k
    assert got[k].flags.c_contiguous, k
    np.testing.assert_array_equal(got[k], want, err_msg=k)
  assert got["bf16"].dtype == np.float32
  # shared storage: independent copies with correct contents
  assert not np.shares_memory(got["shared_a"], got["shared_b"])


def test_torch_module_state_dict_and_wrapped(tmp_path):
  torch.manual_seed(0)
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  sd = module.state_dict()
  path = tmp_path / "model_final.pth"
  torch.save({"model": sd, "iteration": 10}, path)
  got = load_torch_state_dict(path)
  assert list(got) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k].numpy())


def test_torch_loader_does_not_import_torch(tmp_path):
  path = tmp_path / "sd.pt"
  torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
  code = ("import sys\n"
          "from maskformer_jax.convert.safe_pickle import load_torch_state_dict\n"
          f"sd = load_torch_state_dict({str(path)!r})\n"
          "assert sd['w'].tolist() == [[0, 1, 2], [3, 4, 5]], sd\n"
          "assert 'torch' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def _rewrite_data_pkl(src, dst, transform):
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data = zin.read(info)
      if info.filename.endswith("/data.pkl"):
        data = transform(data)
      zout.writestr(info, data)


def test_torch_refuses_forbidden_global(tmp_path):
  target = tmp_path / "pwned.txt"
  path = tmp_path / "evil.pt"
  torch.save({"w": torch.zeros(2), "x": _SystemPayload(target)}, path)
  with pytest.raises(UnsafeCheckpointError) as exc:
    load_torch_state_dict(path)
  assert "system" in str(exc.value) and str(path) in str(exc.value)
  assert not target.exists()

  # A genuine checkpoint whose data.pkl was edited to reference builtins.eval.
  good = tmp_path / "good.pt"
  torch.save({"w": torch.zeros(2)}, good)
  evil2 = tmp_path / "evil2.pt"
  _rewrite_data_pkl(good, evil2, lambda d: d.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"cbuiltins\neval\n"))
  with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
    load_torch_state_dict(evil2)


def test_torch_non_tensor_entry(tmp_path):
  path = tmp_path / "sd.pt"
  torch.save({"w": torch.zeros(2), "dtype": torch.float16}, path)
  with pytest.raises(CheckpointFormatError, match="entry 'dtype'.*not a numeric array"):
    load_torch_state_dict(path)


def test_torch_legacy_and_wrong_files(tmp_path):
  legacy = tmp_path / "legacy.pt"
  torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(CheckpointFormatError, match="legacy.*Re-save it with a recent torch"):
    load_torch_state_dict(legacy)

  d2 = tmp_path / "model.pkl"
  d2.write_bytes(pickle.dumps({"model": _d2_model()}, protocol=2))
  with pytest.raises(CheckpointFormatError, match="load_detectron2_pickle"):
    load_torch_state_dict(d2)
  # and the reverse hint
  pt = tmp_path / "sd.pt"
  torch.save({"w": torch.zeros(2)}, pt)
  with pytest.raises(CheckpointFormatError, match="load_torch_state_dict"):
    load_detectron2_pickle(pt)

  npz = tmp_path / "weights.npz"
  np.savez(npz, w=np.zeros(2))
  with pytest.raises(CheckpointFormatError, match="data.pkl"):
    load_torch_state_dict(npz)

  with pytest.raises(FileNotFoundError, match="not found"):
    load_torch_state_dict(tmp_path / "missing.bin")


def test_torch_truncated_storage(tmp_path):
  good = tmp_path / "good.pt"
  torch.save({"w": torch.arange(12.0).reshape(3, 4)}, good)
  bad = tmp_path / "bad.pt"
  with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
    for info in zin.infolist():
      data = zin.read(info)
      if info.filename.endswith("/data/0"):
        data = data[:20]
      zout.writestr(info, data)
  with pytest.raises(CheckpointFormatError, match="holds only 5 float32 elements") as exc:
    load_torch_state_dict(bad)
  assert str(bad) in str(exc.value)

  truncated = tmp_path / "trunc.pt"
  truncated.write_bytes(good.read_bytes()[:100])
  with pytest.raises(CheckpointFormatError):
    load_torch_state_dict(truncated)
