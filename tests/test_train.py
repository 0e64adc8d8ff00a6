"""The trainer end to end on the built-in dataset's tiny variant: training lowers the loss, a killed run resumes,
8 devices and 2 processes train like 1, and bad configs or workdirs fail clearly."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO_ROOT, "scripts", "train.py")
CONFIG = os.path.join(REPO_ROOT, "configs", "shapes_swin_mini.py")


def tiny_overrides(data_dir, max_steps: int, batch_size: int = 4, checkpoint_every: int = 2) -> list[str]:
  """Flags for a few steps on the 'tiny' (32x32) variant of the built-in dataset."""
  return [f"--config={CONFIG}", "--config.data.dataset=maskformer_shapes/tiny", f"--config.data.data_dir={data_dir}",
          "--config.data.crop_size=(32,32)", "--config.data.train_image_size=(32,32)",
          "--config.data.size_divisibility=32", "--config.data.min_size_train=(32,40)",
          f"--config.solver.max_steps={max_steps}", f"--config.solver.batch_size={batch_size}",
          f"--config.solver.checkpoint_every={checkpoint_every}", "--config.solver.log_every=1",
          "--config.solver.eval_every=1000"]


# Runs of one configuration share their compiled steps through JAX's persistent cache (seconds instead of minutes).
COMPILATION_CACHE = tempfile.mkdtemp(prefix="maskformer_jax_test_cache_")


def train_env(**extra) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE, **extra)


def run_train(args, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, TRAIN, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        env=train_env(), timeout=600, **kwargs)


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A workdir trained for 30 steps, and the completed process."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = run_train([*tiny_overrides(data_dir, max_steps=30, checkpoint_every=10), f"--workdir={workdir}",
                      "--config.solver.base_lr=1e-3"])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_training_lowers_the_loss_and_writes_its_outputs(trained):
  workdir, result = trained
  losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  assert {"validation_loss", "learning_rate", "images_per_second", "PQ", "mIoU"} <= set().union(*read_metrics(workdir))
  assert "30" in os.listdir(workdir / "checkpoints")
  assert os.listdir(workdir / "tensorboard")
  assert json.loads((workdir / "config.json").read_text())["solver"]["max_steps"] == 30
  # The evaluation after the last step: every headline metric, over the whole tiny validation split (8 images).
  results = json.loads((workdir / "eval_results.json").read_text())
  assert results["step"] == 30 and results["num_images"] == 8 and results["split"] == "validation"
  for key in ("mIoU", "fwIoU", "pAcc", "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st",
              "IoU-circle", "PQ-sky"):
    assert key in results
  assert 0 <= results["pAcc"] <= 100
  # The final metrics line carries the headline metrics (rounded to 2 decimals).
  assert f"mIoU={round(results['mIoU'], 2):.4g}" in result.stdout and f"PQ={round(results['PQ'], 2):.4g}" in result.stdout
  # Pictures of the first four validation images (configs/shapes_swin_mini.py: test.num_pictures = 4).
  pictures = sorted(name for name in os.listdir(workdir / "pictures") if name.endswith(".png")
                    and not name.endswith(("_semantic.png", "_panoptic.png")))
  assert len(pictures) == 4, pictures


def test_evaluate_script_writes_results_of_a_chosen_checkpoint(trained, tmp_path):
  workdir, _ = trained
  config = json.loads((workdir / "config.json").read_text())
  out = tmp_path / "eval"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "evaluate.py"),
       *tiny_overrides(config["data"]["data_dir"], max_steps=30), f"--workdir={out}", f"--checkpoint={workdir}",
       "--step=10"], cwd=REPO_ROOT, capture_output=True, text=True, env=train_env(), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((out / "eval_results.json").read_text())
  assert results["num_images"] == 8 and {"PQ", "mIoU", "pAcc"} <= set(results)
  assert json.loads(result.stdout.strip().splitlines()[-1])["PQ"] == round(results["PQ"], 2)
  # A step the workdir does not hold is refused, naming the ones it does.
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "evaluate.py"),
       *tiny_overrides(config["data"]["data_dir"], max_steps=30), f"--workdir={out}", f"--checkpoint={workdir}",
       "--step=7"], cwd=REPO_ROOT, capture_output=True, text=True, env=train_env(), timeout=600)
  assert result.returncode != 0 and "No checkpoint for step 7" in result.stderr and "[10, 20, 30]" in result.stderr


def test_predict_script_writes_pictures_and_label_maps(trained, tmp_path):
  from PIL import Image
  workdir, _ = trained
  config = json.loads((workdir / "config.json").read_text())
  inputs = tmp_path / "images"
  inputs.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(inputs / "a.png")
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(inputs / "b.jpg")
  (inputs / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "predict.py"),
       *tiny_overrides(config["data"]["data_dir"], max_steps=30), f"--checkpoint={workdir}", f"--input={inputs}",
       f"--output={out}"], cwd=REPO_ROOT, capture_output=True, text=True, env=train_env(), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == sorted(f"{stem}{suffix}" for stem in "ab" for suffix in (
      ".png", "_semantic.png", "_panoptic.png", "_segments.json"))
  # Label maps at the input's own size, with classes of the dataset and segments listed for every panoptic id.
  semantic = np.asarray(Image.open(out / "a_semantic.png"))
  assert semantic.shape == (40, 56) and semantic.max() < 8
  rgb = np.asarray(Image.open(out / "a_panoptic.png")).astype(np.int64)
  ids = set(np.unique(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]).tolist()) - {0}
  segments = json.loads((out / "a_segments.json").read_text())["segments_info"]
  assert ids == {segment["id"] for segment in segments}


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / "run"
  args = [*tiny_overrides(data_dir, max_steps=40, checkpoint_every=5), f"--workdir={workdir}"]
  process = subprocess.Popen([sys.executable, TRAIN, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=train_env())
  deadline = time.time() + 300
  checkpoints = workdir / "checkpoints"
  while time.time() < deadline and not (checkpoints.exists() and any(
      name.isdigit() and int(name) >= 10 for name in os.listdir(checkpoints))):
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  steps_before = [m["step"] for m in read_metrics(workdir) if "loss" in m]
  assert 10 <= max(steps_before) < 40

  result = run_train(args)
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = [m["step"] for m in read_metrics(workdir) if "loss" in m][len(steps_before):]
  saved = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  assert saved == 40
  assert resumed[0] > 1 and resumed[0] % 5 == 1, resumed  # continues after a checkpoint, not from step 0
  assert resumed[-1] == 40


def test_incompatible_checkpoint_is_refused(tmp_path, data_dir):
  workdir = tmp_path / "run"
  assert run_train([*tiny_overrides(data_dir, max_steps=2), f"--workdir={workdir}"]).returncode == 0
  result = run_train([*tiny_overrides(data_dir, max_steps=4), f"--workdir={workdir}",
                      "--config.model.num_queries=12"])
  assert result.returncode != 0
  assert "incompatible config" in result.stderr and "model.num_queries was 20, now 12" in result.stderr


def test_unknown_config_key_is_refused(tmp_path, data_dir):
  result = run_train([*tiny_overrides(data_dir, max_steps=2), f"--workdir={tmp_path}",
                      "--config.solver.learning_rate=1e-3"])
  assert result.returncode != 0 and "unknown config key" in result.stderr


SHARDED_STEP = textwrap.dedent("""
  import sys
  import jax
  import numpy as np
  sys.path.insert(0, sys.argv[1])
  from configs import shapes_swin_mini
  from maskformer_jax import checkpoint, sharding, train
  from maskformer_jax.models import build_model

  assert jax.device_count() == 8
  config = shapes_swin_mini.get_config()
  config.solver.batch_size = 8
  model = build_model(config.model)
  rng = np.random.default_rng(0)
  batch = {"images": rng.standard_normal((8, 64, 64, 3)).astype(np.float32),
           "labels": rng.integers(0, 8, (8, 16)).astype(np.int32),
           "masks": (rng.random((8, 16, 64, 64)) < 0.3).astype(np.uint8),
           "valid": rng.random((8, 16)) < 0.5}
  results = {}
  for devices in (1, 8):
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    state, tx = train.create_train_state(config, model, sharding.replicated(mesh))
    step = jax.jit(train.make_train_step(model, tx, config),
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
    with jax.set_mesh(mesh):
      new_state, metrics = step(state, sharding.global_batch(batch, sharding.batch_sharding(mesh)))
    results[devices] = jax.device_get((new_state.params, metrics["loss"]))
  (params_1, loss_1), (params_8, loss_8) = results[1], results[8]
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  # A checkpoint saved from the 8-device mesh restores onto a 2-device one.
  checkpoints = checkpoint.Checkpoints(sys.argv[2], config)
  checkpoints.save(1, new_state)
  checkpoints.close()
  two = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  init_state, _ = train.train_state_initializer(config, model)
  restored = checkpoint.Checkpoints(sys.argv[2], config).restore_latest(jax.eval_shape(init_state),
                                                                        sharding.replicated(two))
  assert int(restored.step) == 1
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.device_set == set(jax.devices()[:2])
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(params_8)):
    np.testing.assert_array_equal(a, b)
  print("OK", float(loss_1), float(loss_8))
""")


def test_eight_devices_train_like_one_and_checkpoints_move_between_meshes(tmp_path):
  result = subprocess.run([sys.executable, "-c", SHARDED_STEP, REPO_ROOT, str(tmp_path / "run")],
                          capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8"), timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_in_step(tmp_path, data_dir):
  port = _free_port()
  processes = []
  for process_id in range(2):
    args = [*tiny_overrides(data_dir, max_steps=3), f"--workdir={tmp_path / 'run'}", "--num_processes=2",
            f"--process_id={process_id}", f"--coordinator_address=localhost:{port}"]
    processes.append(subprocess.Popen([sys.executable, TRAIN, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env=train_env(JAX_NUM_CPU_DEVICES="2")))
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  # Both processes print the same final metrics (timings aside): one global batch, one loss, one update.
  final = [dict(item.split("=") for item in out.strip().splitlines()[-1].split()) for out, _ in outputs]
  for metrics in final:
    metrics.pop("images_per_second")
  assert {"loss", "grad_norm", "validation_loss"} <= set(final[0])
  assert final[0] == final[1]
