"""tf.data input pipelines: TFDS panoptic examples -> static-shape numpy batches of images and mask targets.

Datasets have the features of TFDS `coco/2017_panoptic` (`image`, `image/id`, `panoptic_image` whose RGB encodes
the segment id, 0 = void, and `panoptic_objects` with `id`, `label`, `is_crowd`). Each batch is a dict:
  images         float32 `[B, H, W, 3]`  RGB, (x - pixel_mean) / pixel_std; padding was image_pad_value before that
  labels         int32 `[B, M]`          class of each target mask in [0, num_classes); 0 in padded slots
  masks          uint8 `[B, M, H, W]`    binary target masks; all zero in padded slots and in padded pixels
  valid          bool `[B, M]`           which slots hold real targets
  example_valid  bool `[B]`              (eval only) False for the examples that fill up the last batch
with (H, W) = data.train_image_size and M = data.max_segments.

Targets follow the reference mappers (reference section 4): task 'panoptic' gives one mask per non-crowd segment
in panoptic_objects order, labelled with its class (crowd pixels belong to no mask; a segment the crop removed keeps
its now empty mask, as in the reference); task 'semantic' maps each pixel to its segment's class (crowd segments
included, void -> ignore_label) and gives one mask per class present after augmentation, in ascending class order.

Inconsistent data fails loudly, naming the example (`image/id`) and the fix: an image or panoptic PNG that is not
a PNG/JPEG, image and annotation of different sizes, a repeated segment id, a PNG segment id missing from
panoptic_objects, a label outside [0, num_classes), more targets than max_segments, an image larger than
train_image_size. Errors TF raises while iterating come out as ValueErrors that name the dataset and split.

`ground_truth_examples` gives the unpadded, unnormalised examples that evaluation and pictures need.

`make_train_dataset`, `make_eval_dataset` and `ground_truth_examples` read TFDS; `train_batches`, `eval_batches` and `example_fn` do the
work on any `tf.data.Dataset` of such examples (with the two images still encoded) and are what the tests drive.
"""
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from maskformer_jax.data import builders  # noqa: F401  registers the built-in datasets with TFDS
from maskformer_jax.data import panoptic, transforms

# Image features decoded here rather than by TFDS, so that a corrupt file fails with a message naming the example.
ENCODED_FEATURES = ("image", "panoptic_image")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# Built-in datasets that are generated procedurally: preparing them on first use downloads nothing.
PROCEDURAL_DATASETS = ("maskformer_shapes",)


def _check(condition: tf.Tensor, template: str, *values) -> tf.Operation:
  """Assert `condition`; on failure the message is `template` with `{}` replaced by `values` (up to 20 elements
  of each)."""
  return tf.debugging.Assert(condition, [tf.strings.format(template, values, summarize=20)])


def decode_image(data: tf.Tensor, image_id: tf.Tensor, feature: str, *, png_only: bool) -> tf.Tensor:
  """Encoded PNG (or, unless `png_only`, JPEG) bytes -> uint8 `[H, W, 3]`, after checking the file signature.

  A file that starts like an image but is damaged further in fails inside TF's decoder; that message cannot name
  the example, but the iterator of `make_*_dataset` adds the dataset and split.
  """
  is_png = tf.equal(tf.strings.substr(data, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)
  is_jpeg = tf.equal(tf.strings.substr(data, 0, len(JPEG_SIGNATURE)), JPEG_SIGNATURE)
  kind = "PNG" if png_only else "PNG or JPEG"
  check = _check(is_png if png_only else tf.logical_or(is_png, is_jpeg),
                 f"image/id {{}}: the {feature} feature is not a {kind} file ({{}} bytes); the stored example is "
                 "corrupt: rebuild the dataset (tfds build / download_and_prepare) or fix its source file.",
                 image_id, tf.strings.length(data))
  with tf.control_dependencies([check]):
    return tf.io.decode_image(data, channels=3, expand_animations=False)


def check_example(image_id: tf.Tensor, image: tf.Tensor, id_map: tf.Tensor, objects: dict,
                  data: ml_collections.ConfigDict) -> list:
  """Assertions on one decoded example: image uint8 `[H, W, 3]`, id_map int32 `[H, W]`, objects as in TFDS."""
  segment_ids = tf.cast(objects["id"], tf.int32)
  labels = objects["label"]
  png_ids, _ = tf.unique(tf.reshape(id_map, [-1]))
  known = tf.logical_or(tf.equal(png_ids, 0), tf.reduce_any(tf.equal(png_ids[:, None], segment_ids[None, :]), 1))
  missing = tf.boolean_mask(png_ids, tf.logical_not(known))
  bad_labels = tf.boolean_mask(labels, tf.logical_or(labels < 0, labels >= data.num_classes))
  if data.task == "panoptic":
    num_targets = tf.reduce_sum(tf.cast(tf.logical_not(objects["is_crowd"]), tf.int32))
    what = "non-crowd segments"
  else:
    num_targets = tf.size(tf.unique(labels).y)
    what = "classes"
  return [
      _check(tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(id_map))),
             "image/id {}: the image is {} (h, w) but its panoptic_image is {}; rebuild the dataset.",
             image_id, tf.shape(image)[:2], tf.shape(id_map)),
      _check(tf.equal(tf.size(tf.unique(segment_ids).y), tf.size(segment_ids)),
             "image/id {}: panoptic_objects/id {} repeats an id; segment ids must be distinct: fix the dataset "
             "builder and rebuild.", image_id, segment_ids),
      _check(tf.equal(tf.size(missing), 0),
             "image/id {}: panoptic_image has segment id(s) {} that are not in panoptic_objects/id {}; every nonzero "
             "id of the PNG (R + 256 G + 256^2 B) needs a segment entry: fix the dataset builder and rebuild.",
             image_id, missing, segment_ids),
      _check(tf.equal(tf.size(bad_labels), 0),
             f"image/id {{}}: segment label(s) {{}} outside [0, {data.num_classes}); set data.num_classes (it is "
             "linked to model.num_classes) to the number of classes of the dataset, or fix the labels of its builder.",
             image_id, bad_labels),
      _check(num_targets <= data.max_segments,
             f"image/id {{}}: {{}} {what} but data.max_segments is {data.max_segments}; raise data.max_segments "
             f"(e.g. --config.data.max_segments=...) to at least the largest count in the dataset.",
             image_id, num_targets),
  ]


def decode_example(example: dict, data: ml_collections.ConfigDict) -> tuple:
  """`(image_id, image uint8 [H, W, 3], id_map int32 [H, W], objects)` of one encoded example, after
  `check_example`: everything returned goes through identities that depend on the checks, so no op can fail on bad
  data before the checks report it."""
  image_id, objects = example["image/id"], example["panoptic_objects"]
  image = decode_image(example["image"], image_id, "image", png_only=False)
  id_map = panoptic.rgb2id_tf(decode_image(example["panoptic_image"], image_id, "panoptic_image", png_only=True))
  with tf.control_dependencies(check_example(image_id, image, id_map, objects, data)):
    return tf.nest.map_structure(tf.identity, (image_id, image, id_map, objects))


def _lookup(keys: tf.Tensor, values: tf.Tensor, query: tf.Tensor, default: int) -> tf.Tensor:
  """`values[i]` where `query == keys[i]`, else `default`: keys int32 `[N]` (distinct, any order), values int32
  `[N]`, query int32 of any shape."""
  # A largest key mapping to `default` keeps every search position inside the table, even for an empty one.
  keys = tf.concat([keys, [tf.int32.max]], 0)
  values = tf.concat([values, [default]], 0)
  order = tf.argsort(keys)
  keys, values = tf.gather(keys, order), tf.gather(values, order)
  flat = tf.reshape(query, [-1])
  position = tf.searchsorted(keys, flat)
  found = tf.equal(tf.gather(keys, position), flat)
  return tf.reshape(tf.where(found, tf.gather(values, position), default), tf.shape(query))


def semantic_map(id_map: tf.Tensor, objects: dict, ignore_label: int) -> tf.Tensor:
  """Class of each pixel's segment, int32 `[H, W]`; void (id 0) and ids without a segment -> ignore_label."""
  return _lookup(tf.cast(objects["id"], tf.int32), tf.cast(objects["label"], tf.int32), id_map, ignore_label)


def _targets(slots: tf.Tensor, labels: tf.Tensor, max_segments: int) -> dict:
  """Masks from a map int32 `[H, W]` of each pixel's target (-1: none) and the targets' labels `[K]`, padded to
  `max_segments`."""
  num = tf.size(labels)
  return {
      "labels": tf.ensure_shape(tf.pad(tf.cast(labels, tf.int32), [[0, max_segments - num]]), [max_segments]),
      # One pass writing the M x H x W bytes once: building the masks this way costs little more than the copy that
      # batching makes of them.
      "masks": tf.one_hot(slots, max_segments, axis=0, dtype=tf.uint8),
      "valid": tf.range(max_segments) < num,
  }


def panoptic_targets(id_map: tf.Tensor, objects: dict, max_segments: int) -> dict:
  """One mask per non-crowd segment of `objects`, in their order: labels int32 `[M]`, masks uint8 `[M, H, W]`,
  valid bool `[M]`, from the segment-id map int32 `[H, W]`."""
  keep = tf.logical_not(objects["is_crowd"])
  ids = tf.boolean_mask(tf.cast(objects["id"], tf.int32), keep)
  slots = _lookup(ids, tf.range(tf.size(ids)), id_map, -1)
  return _targets(slots, tf.boolean_mask(objects["label"], keep), max_segments)


def semantic_targets(semantic: tf.Tensor, ignore_label: int, max_segments: int) -> dict:
  """One mask per class present in the semantic map int32 `[H, W]` (ascending, ignore_label excluded); same
  outputs as `panoptic_targets`."""
  classes, _ = tf.unique(tf.reshape(semantic, [-1]))
  classes = tf.sort(tf.boolean_mask(classes, tf.not_equal(classes, ignore_label)))
  return _targets(_lookup(classes, tf.range(tf.size(classes)), semantic, -1), classes, max_segments)


def example_fn(data: ml_collections.ConfigDict, *, train: bool):
  """`(index, example) -> dict` for one encoded example (see the module docstring for the outputs).

  Training augments with the stateless seed `[data.seed, index]`; evaluation only pads. Either way the image is
  padded bottom/right to `data.train_image_size` and must fit in it.
  """
  if data.task not in ("panoptic", "semantic"):
    raise ValueError(f"data.task must be 'panoptic' or 'semantic'; got {data.task!r}.")
  size = tuple(data.train_image_size)
  mean = tf.constant(data.pixel_mean, tf.float32)
  std = tf.constant(data.pixel_std, tf.float32)
  # What else bounds the image size: the crop in the semantic recipe, the long-side cap in the DETR one.
  if not train:
    fix = "evaluation pads without resizing"
  elif data.crop_type == "absolute":
    fix = "or lower data.crop_size"
  else:
    fix = "or lower data.max_size_train"

  def fn(index: tf.Tensor, example: dict) -> dict:
    image_id, image, id_map, objects = decode_example(example, data)
    image = tf.cast(image, tf.float32)
    if train:
      seed = tf.stack([tf.constant(data.seed, tf.int64), tf.cast(index, tf.int64)])
      image, id_map = transforms.augment(image, id_map, seed, data)
    too_large = tf.strings.format(f"image/id {{}} is larger than data.train_image_size {size}: raise "
                                  f"data.train_image_size ({fix}).", [image_id])
    # Padding with void keeps padded pixels out of every mask; in semantic maps void becomes ignore_label.
    image, id_map = transforms.pad_to_size(image, id_map, size, image_pad_value=data.image_pad_value,
                                           label_pad_value=0, too_large=too_large)
    if data.task == "panoptic":
      targets = panoptic_targets(id_map, objects, data.max_segments)
    else:
      targets = semantic_targets(semantic_map(id_map, objects, data.ignore_label), data.ignore_label,
                                 data.max_segments)
    return {"images": (image - mean) / std, **targets}

  return fn


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_batches(examples: tf.data.Dataset, data: ml_collections.ConfigDict, *, batch_size: int,
                  start_example: int = 0, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Shuffled, repeated, augmented batches of `batch_size` from one process's `examples`.

  The order is a function of `data.seed` alone: each epoch is reshuffled (`data.shuffle_buffer`) from that seed.
  Example k of this process's stream is augmented with seed `[data.seed, k * process_count + process_index]`, which
  is unique over processes, and `start_example` skips the first examples of the stream (before they are decoded),
  so a run resumed with start_example = steps done x batch_size sees exactly the batches the first run would have.
  """
  ds = examples.shuffle(data.shuffle_buffer, seed=data.seed, reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().skip(start_example)
  fn = example_fn(data, train=True)
  ds = ds.map(lambda index, example: fn(index * process_count + process_index, example),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches(examples: tf.data.Dataset, data: ml_collections.ConfigDict, *, batch_size: int,
                 num_batches: int) -> tf.data.Dataset:
  """`examples` in order, unaugmented, as exactly `num_batches` batches (with `example_valid`), the last ones
  filled up with all-zero examples whose example_valid is False. `num_batches` must hold every example."""
  num_examples = int(examples.cardinality())
  if num_examples > num_batches * batch_size:  # UNKNOWN and INFINITE cardinalities are negative
    raise ValueError(f"{num_batches} batches of {batch_size} cannot hold the {num_examples} examples to evaluate.")
  fn = example_fn(data, train=False)
  ds = examples.map(lambda example: {**fn(0, example), "example_valid": True}, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
  filler = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat()).take(num_batches * batch_size)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())


class Batches:
  """Iterator of numpy batches; bad data found while producing one (a failed check here, an image TF cannot
  decode, a damaged TFRecord) raises a ValueError that names the data (`description`) and quotes TF."""

  def __init__(self, dataset: tf.data.Dataset, description: str, num_batches: int | None = None):
    self.dataset = dataset
    self.description = description
    self.num_batches = num_batches
    self._iterator = iter(tfds.as_numpy(dataset))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self._iterator)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:  # bad data, or a damaged record file
      message = error.message
      if "assertion failed: " in message:  # one of the checks here: keep its text, not the op trace around it
        message = message.split("assertion failed: ", 1)[1].split("\n\t [[", 1)[0]
      raise ValueError(f"Input pipeline of {self.description} failed: {message}") from error


def _skip_decoding() -> dict:
  return {feature: tfds.decode.SkipDecoding() for feature in ENCODED_FEATURES}


def prepare_dataset(data: ml_collections.ConfigDict, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `data.dataset`. The built-in procedural datasets are generated on first use
  (nothing is downloaded); any other dataset must have been prepared beforehand.

  Several processes must not generate one dataset directory at once: a multi-process run calls this on process 0
  first, and on the others after a barrier (see `train.py`).
  """
  builder = tfds.builder(data.dataset, data_dir=data_dir)
  if not builder.is_prepared():
    if builder.name not in PROCEDURAL_DATASETS:
      raise ValueError(f"TFDS dataset {data.dataset!r} is not prepared in {builder.data_dir}; prepare it first "
                       f"(tfds build, or its builder's download_and_prepare) or pass the data_dir that holds it.")
    builder.download_and_prepare()
  return builder


def dataset_categories(data: ml_collections.ConfigDict, data_dir: str | None = None) -> list[dict]:
  """The dataset's classes in label order, `[{"id", "name", "isthing"}]` (COCO panoptic style), from its TFDS
  metadata."""
  builder = prepare_dataset(data, data_dir)
  categories = (builder.info.metadata or {}).get("categories")
  if not categories:
    raise ValueError(f"{data.dataset} has no 'categories' in its TFDS metadata, so things and stuff are unknown; "
                     "its builder must store [{'id', 'name', 'isthing'}, ...] in label order in "
                     "DatasetInfo.metadata['categories'].")
  if len(categories) != data.num_classes:
    raise ValueError(f"{data.dataset} has {len(categories)} categories but data.num_classes is {data.num_classes}; "
                     "set data.num_classes to the dataset's class count.")
  return [dict(category) for category in categories]


def read_split(data: ml_collections.ConfigDict, split: str, *, shuffle: bool, process_index: int = 0,
               process_count: int = 1, data_dir: str | None = None) -> tuple[tf.data.Dataset, int]:
  """This process's contiguous, disjoint share of `split` (tfds.even_splits), with `image` and `panoptic_image`
  still encoded, and the number of examples in the largest share. `shuffle`: read the files in an order drawn from
  data.seed (reshuffled on each pass); otherwise in their stored order."""
  builder = prepare_dataset(data, data_dir)
  num_examples = builder.info.splits[split].num_examples
  if num_examples < process_count:
    raise ValueError(f"Split {split!r} of {data.dataset} has {num_examples} examples, fewer than the "
                     f"{process_count} processes that read it.")
  # No TFDS autocache: every pass builds a new dataset, so the cache never serves a second pass, and a pass read
  # only in part (the pictures) would end with TF's warning that the partial cache was discarded.
  read_config = tfds.ReadConfig(shuffle_seed=data.seed if shuffle else None, options=_options(), try_autocache=False)
  examples = builder.as_dataset(split=tfds.even_splits(split, process_count)[process_index], shuffle_files=shuffle,
                                decoders=_skip_decoding(), read_config=read_config)
  return examples, -(-num_examples // process_count)


def make_train_dataset(data: ml_collections.ConfigDict, *, batch_size: int, process_index: int = 0,
                       process_count: int = 1, start_example: int = 0, data_dir: str | None = None) -> Batches:
  """Endless training batches of `batch_size` (this process's share of the global batch) from data.train_split.

  Each process reads its own disjoint share of the split (tfds.even_splits). Files and examples are shuffled with
  `data.seed`, so the same seed gives the same stream; `start_example` (per process: steps done x batch_size) resumes
  the stream at that point. See `train_batches`.
  """
  examples, _ = read_split(data, data.train_split, shuffle=True, process_index=process_index,
                           process_count=process_count, data_dir=data_dir)
  ds = train_batches(examples, data, batch_size=batch_size, start_example=start_example,
                     process_index=process_index, process_count=process_count)
  return Batches(ds, f"{data.dataset}:{data.train_split} (process {process_index} of {process_count})")


def make_eval_dataset(data: ml_collections.ConfigDict, *, split: str, batch_size: int, process_index: int = 0,
                      process_count: int = 1, data_dir: str | None = None) -> Batches:
  """One unaugmented pass over this process's share of `split`, in a fixed order, as static-shape batches.

  Images are not resized, only padded to data.train_image_size (a larger image is an error naming that field).
  Every process yields the same number of batches, `ceil(ceil(num_examples / process_count) / batch_size)`
  (`Batches.num_batches`), so that a multi-process evaluation steps in lockstep; `example_valid` marks the
  examples that only fill up the last batches.
  """
  examples, largest_share = read_split(data, split, shuffle=False, process_index=process_index,
                                       process_count=process_count, data_dir=data_dir)
  num_batches = -(-largest_share // batch_size)
  ds = eval_batches(examples, data, batch_size=batch_size, num_batches=num_batches)
  return Batches(ds, f"{data.dataset}:{split} (process {process_index} of {process_count})", num_batches)


def ground_truth_examples(data: ml_collections.ConfigDict, split: str, *, process_index: int = 0,
                          process_count: int = 1, data_dir: str | None = None):
  """This process's share of `split` as evaluation needs it, unaugmented and unpadded, in stored order.

  Returns `(examples, count)`: `count` is the size of this share and `examples` an iterator of dicts of numpy
  values: `image_id` int, `image` uint8 `[H, W, 3]`, `panoptic` int32 `[H, W]` segment ids (0 = void), `semantic`
  int32 `[H, W]` classes (crowd segments included, void -> data.ignore_label) and `segments`, a list of
  `{"id", "category_id", "iscrowd"}` (category_id is the class index). The same checks as training apply.
  """
  examples, _ = read_split(data, split, shuffle=False, process_index=process_index, process_count=process_count,
                           data_dir=data_dir)
  count = int(examples.cardinality())

  def decode(example: dict) -> dict:
    image_id, image, id_map, objects = decode_example(example, data)
    return {"image_id": image_id, "image": image, "panoptic": id_map,
            "semantic": semantic_map(id_map, objects, data.ignore_label),
            "ids": objects["id"], "labels": objects["label"], "is_crowd": objects["is_crowd"]}

  def numpy_examples():
    # Batches' iterator turns a failed check into a ValueError naming the example.
    for example in Batches(examples.map(decode), f"{data.dataset}:{split} (process {process_index})"):
      segments = [{"id": int(i), "category_id": int(label), "iscrowd": int(crowd)}
                  for i, label, crowd in zip(example["ids"], example["labels"], example["is_crowd"])]
      yield {"image_id": int(example["image_id"]), "image": example["image"], "panoptic": example["panoptic"],
             "semantic": example["semantic"], "segments": segments}

  return numpy_examples(), count
