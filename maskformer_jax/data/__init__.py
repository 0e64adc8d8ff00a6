"""Datasets and input pipelines: panoptic PNG encoding, the built-in TFDS builders, tf.data preprocessing."""
