"""The data set on the device, as airbench's loader owns it: placed on the mesh once, then cut
into batches inside the compiled steps, so that no image crosses from the host during an epoch.

`place_data(dataset, mesh, batch_size)` is the one way the engine, the benchmark and the tests
put a data set on the devices.
"""
from typing import Any

import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh

from cbam_jax import distributed

# The share of a device's memory the data set may take: the model, its optimizer state and a
# batch's activations need the rest.
DATA_SHARE = 0.5


@flax.struct.dataclass
class DeviceData:
    """uint8 images and int32 labels replicated on every device of the mesh, and how a batch is
    cut from them. The test split is padded to whole batches; `test_mask` marks the real rows.
    A pytree: the arrays are its leaves, `batch_size` and `batch_sharding` static."""

    train_images: jax.Array  # uint8 [N, 32, 32, 3]
    train_labels: jax.Array  # int32 [N]
    test_images: jax.Array   # uint8 [M, 32, 32, 3], M = whole batches >= the real test images
    test_labels: jax.Array   # int32 [M]
    test_mask: jax.Array     # bool [M]: False on padding rows
    batch_size: int = flax.struct.field(pytree_node=False)
    num_test: int = flax.struct.field(pytree_node=False)  # real test images (mask.sum())
    # Splits a batch's leading axis over the mesh (cbam_jax.distributed.batch_sharding).
    batch_sharding: Any = flax.struct.field(pytree_node=False, default=None)

    @property
    def num_train(self) -> int:
        return self.train_labels.shape[0]

    @property
    def num_train_batches(self) -> int:
        """The tutorial's DataLoader keeps the final partial batch: ceil(N / batch_size)."""
        return -(-self.num_train // self.batch_size)

    @property
    def train_batch_sizes(self) -> np.ndarray:
        """Images in each batch of an epoch: batch_size, and the remainder last."""
        return np.minimum(self.batch_size,
                          self.num_train - self.batch_size * np.arange(self.num_train_batches))

    @property
    def num_test_batches(self) -> int:
        return self.test_labels.shape[0] // self.batch_size

    def train_batch(self, perm, batch, size: int):
        """Inside jit: batch `batch` of the epoch's permutation, `size` images (uint8, labels),
        laid out over the mesh."""
        idx = jax.lax.dynamic_slice_in_dim(perm, batch * self.batch_size, size)
        return self._shard(self.train_images[idx]), self._shard(self.train_labels[idx])

    def test_batch(self, batch):
        """Inside jit: batch `batch` of the padded test split: (images, labels, mask)."""
        cut = lambda a: self._shard(
            jax.lax.dynamic_slice_in_dim(a, batch * self.batch_size, self.batch_size))
        return cut(self.test_images), cut(self.test_labels), cut(self.test_mask)

    def _shard(self, x):
        return distributed.shard_batch(x, self.batch_sharding)


def pad_to_batches(images, labels, batch_size: int):
    """(images, labels, mask) padded with zero rows to a multiple of `batch_size`; the mask
    marks the real rows."""
    n = len(labels)
    pad = -(-n // batch_size) * batch_size - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return images, labels, mask


def place_data(dataset, mesh: Mesh, batch_size: int) -> DeviceData:
    """A `cbam_jax.data.Dataset` on every device of `mesh`, cut into `batch_size` batches that
    are split over the mesh (which must divide `batch_size`)."""
    distributed.check_batch_size(batch_size, mesh)
    test = pad_to_batches(np.asarray(dataset.test_images, np.uint8),
                          np.asarray(dataset.test_labels, np.int32), batch_size)
    arrays = distributed.put_replicated(
        (np.asarray(dataset.train_images, np.uint8), np.asarray(dataset.train_labels, np.int32),
         *test), mesh)
    return DeviceData(*arrays, batch_size=batch_size, num_test=len(dataset.test_labels),
                      batch_sharding=distributed.batch_sharding(mesh))


def dataset_bytes(num_images: int, image_size: int) -> int:
    """Bytes of `num_images` uint8 RGB images of `image_size` and their int32 labels."""
    return num_images * (image_size * image_size * 3 + 4)


def available_bytes(device) -> int | None:
    """What `device` can hold: an accelerator's allocator limit (`memory_stats`), or on a CPU
    the host memory now available (/proc/meminfo's MemAvailable); None if unknown."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def fit_refusal(num_images: int, image_size: int, copies: int, available: int) -> str | None:
    """Why `num_images` images of `image_size` in `copies` copies do not fit in `available`
    bytes (a DATA_SHARE of it), with the largest --image-size that would fit; None if they do."""
    budget = available * DATA_SHARE
    needed = copies * dataset_bytes(num_images, image_size)
    if needed <= budget:
        return None
    fits = next((s for s in range(image_size - 1, 0, -1)
                 if copies * dataset_bytes(num_images, s) <= budget), None)
    where = f" ({copies} copies: one per device, all in the host's memory)" if copies > 1 else ""
    advice = (f"--image-size {fits} would fit" if fits else "no image size fits; use fewer images")
    return (f"the data set ({num_images} images at {image_size}x{image_size}) needs "
            f"{needed / 2**30:.2f} GiB{where}, more than the {DATA_SHARE:.0%} of the device's "
            f"{available / 2**30:.2f} GiB it may take; {advice}")


def check_fits(dataset, mesh: Mesh, available: int | None = None) -> None:
    """Refuses (MemoryError) a data set that `place_data` could not put on `mesh`'s devices,
    before it tries: each device holds a copy; CPU devices share the host's memory.
    `available`: bytes per device (default: `available_bytes` of the first)."""
    device = mesh.devices.flat[0]
    available = available_bytes(device) if available is None else available
    if available is None:
        return
    copies = mesh.devices.size if device.platform == "cpu" else 1
    num_images = len(dataset.train_labels) + len(dataset.test_labels)
    refusal = fit_refusal(num_images, int(dataset.train_images.shape[1]), copies, available)
    if refusal is not None:
        raise MemoryError(refusal)
