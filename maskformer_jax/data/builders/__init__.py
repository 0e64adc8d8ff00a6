"""The built-in TFDS datasets; importing this package registers them with TFDS."""
from maskformer_jax.data.builders import shapes  # noqa: F401
