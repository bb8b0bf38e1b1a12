"""Data: the built-in synthetic set, ImageNet-layout folders and prepared sets, with the paper's augmentation.

Determinism. Both processes of a model-parallel pair build their own loader and must see the same
batches. Every random choice is therefore a pure function of (train.seed, epoch, sample index): the
epoch's shuffle is a permutation drawn from (seed, epoch), and each sample's crop, flip and lighting
come from a generator seeded with (seed, epoch, index). Nothing reads a global RNG, so the batches do
not depend on num_workers, on which worker loads a sample, or on what else the process has drawn.

Pipeline. Sources hold uint8 images at the stored side S (data.image_size for synthetic data,
data.resize otherwise). A loader worker decodes only the rows its column owns (own_rows) and cuts
uint8 crops; the batch's metadata (labels, offsets, flips, lighting) covers every row. The
Normalizer turns crops into model input on the model's device.
"""
from .augment import Augment
from .batch import Batch, batch_checksum, own_rows
from .bundle import VERIFY_AT_BUILD_MAX, DataBundle, build_data, dataset_fingerprint
from .common import DataError
from .decode import decode_bytes, decode_file, pil_to_rgb
from .device import DeviceDecoder
from .loaders import Loaders, steps_per_epoch
from .normalize import Normalizer
from .stats import STATS_IMAGES
from .synthetic import SYNTH_MEMORY_MAX, synthetic_classes

__all__ = [
    "Augment", "Batch", "DataBundle", "DataError", "DeviceDecoder", "Loaders", "Normalizer",
    "STATS_IMAGES", "SYNTH_MEMORY_MAX", "VERIFY_AT_BUILD_MAX", "batch_checksum", "build_data",
    "dataset_fingerprint", "decode_bytes", "decode_file", "own_rows", "pil_to_rgb", "steps_per_epoch",
    "synthetic_classes",
]
