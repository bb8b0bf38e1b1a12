"""Building a data set once per process: sources, classes, statistics, fingerprints.

Corrupt images (folder data). A set of at most VERIFY_AT_BUILD_MAX files is decoded in full at build
time, so a bad file is reported before training starts; with bad_images=skip it is left out, counted
in DataBundle.skipped and listed in skipped_files. Larger sets are not read at build time (that
would cost a full pass over the data per process); a file that fails to decode later raises
DataError (bad_images=error) or is replaced by the next readable image of its class, and its path
is listed in that batch's Batch.unreadable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from ..config import Config
from .common import READ_ERRORS, SALT_TRAIN, SALT_VAL, DataError, unreadable
from .decode import DECODER_VERSION, decode_file
from .folders import FolderSource, Listing, full_fingerprint, sample_fingerprint, scan
from .prepared import open_prepared, prepared_fingerprint
from .sources import Source
from .stats import STATS_VERSION, cached_stats, source_stats
from .synthetic import SyntheticRenderer, SyntheticSource, class_name, synthetic_classes, synthetic_fingerprint

VERIFY_AT_BUILD_MAX = 5000  # folder sets up to this many files are fully decoded at build time


@dataclass
class DataBundle:
    train: Source  # training split (uint8 stored images, labels)
    val: Source  # evaluation split
    classes: list[str]  # class names in label order
    stats: dict  # mean, std (3, [0, 1] units), eigval (3), eigvec (3 x 3, columns), mean_image (3, S, S; 0-255)
    side: int  # stored image side S
    skipped: int = 0  # unreadable images left out at build time (bad_images=skip)
    skipped_files: list[str] = field(default_factory=list)  # their paths
    skipped_links: list[str] = field(default_factory=list)  # symbolic links the scan did not follow
    fingerprint: str = ""  # dataset_fingerprint(cfg, "full") at build time
    sample_fingerprint: str = ""  # dataset_fingerprint(cfg, "sample") at build time
    stats_from_cache: bool = False  # statistics read from cache_dir (or the prepared set) rather than computed

    mean = property(lambda self: list(self.stats["mean"]))
    std = property(lambda self: list(self.stats["std"]))
    eigval = property(lambda self: list(self.stats["eigval"]))
    eigvec = property(lambda self: [list(r) for r in self.stats["eigvec"]])
    mean_image = property(lambda self: self.stats["mean_image"])

    def fingerprint_for(self, mode: str) -> str:
        """The build-time fingerprint that dataset_fingerprint(cfg, mode) is compared against."""
        return {"full": self.fingerprint, "sample": self.sample_fingerprint}[mode]


def _build_synthetic(cfg: Config, progress) -> DataBundle:
    d = cfg.data
    train, val = (SyntheticSource(SyntheticRenderer(cfg.model.num_classes, d.image_size, cfg.train.seed, salt), n)
                  for salt, n in ((SALT_TRAIN, d.train_size), (SALT_VAL, d.val_size)))
    classes = [class_name(*spec) for spec in synthetic_classes(cfg.model.num_classes)]
    fp = synthetic_fingerprint(cfg)
    return DataBundle(train, val, classes, source_stats(train, progress), d.image_size,
                      fingerprint=fp, sample_fingerprint=fp)


def _verify(root: Path, files: dict, cfg: Config, progress) -> list[str]:
    """Decode every file (small sets); drop the unreadable ones (bad_images=skip) and return them."""
    skipped, total, done = [], sum(map(len, files.values())), 0
    for split, items in files.items():
        keep = []
        for rel, label in items:
            try:
                decode_file(root / rel, cfg.data.resize)
                keep.append((rel, label))
            except READ_ERRORS as e:
                if cfg.data.bad_images == "error":
                    raise DataError(unreadable(root / rel, e)) from None
                skipped.append(str(root / rel))
            done += 1
            if progress and (done % 100 == 0 or done == total):
                progress(done, total, "verifying images")
        files[split] = keep
    return skipped


def _build_folder(cfg: Config, cache_dir, progress) -> DataBundle:
    d = cfg.data
    listing: Listing = scan(d.root, stat=True, progress=progress)
    root, classes = listing.root, sorted(listing.splits["train"])
    if cfg.model.num_classes != len(classes):
        raise DataError(f"{root} has {len(classes)} classes but model.num_classes={cfg.model.num_classes}; "
                        f"set model.num_classes={len(classes)}")
    files = {split: listing.files(split) for split in ("train", "val")}
    skipped = _verify(root, files, cfg, progress) if sum(map(len, files.values())) <= VERIFY_AT_BUILD_MAX else []
    for split, items in files.items():
        present = {label for _, label in items}
        for label, cls in enumerate(classes):
            if label not in present:
                raise DataError(f"class folder {root / split / cls} holds no readable images "
                                f"({' '.join(IMG_EXTENSIONS)}); add images or remove the class from train/ and val/")
    train, val = (FolderSource(root, files[s], d.resize, d.bad_images) for s in ("train", "val"))
    key = full_fingerprint(listing, only=("train",), salt=f"stats v{STATS_VERSION} decoder v{DECODER_VERSION} "
                                                          f"resize={d.resize}\n")
    stats, from_cache = cached_stats(cache_dir, key, train, progress)
    return DataBundle(train, val, classes, stats, d.resize, len(skipped), skipped, list(listing.links_skipped),
                      full_fingerprint(listing), sample_fingerprint(listing, d.check_sample), from_cache)


def _build_prepared(cfg: Config, progress) -> DataBundle:
    d = cfg.data
    if not d.root:
        raise DataError("data.dataset=prepared needs data.root=OUT, a folder written by python -m alexnet_mp.prepare")
    manifest, sources, stats = open_prepared(d.root, d.resize, cfg.model.num_classes, d.bad_images, progress)
    fp = prepared_fingerprint(d.root)
    skipped = list(manifest.get("skipped", []))
    return DataBundle(sources["train"], sources["val"], list(manifest["classes"]), stats, manifest["size"],
                      len(skipped), skipped, [], fp, fp, True)


def build_data(cfg: Config, cache_dir: str | Path | None = None, progress=None) -> DataBundle:
    """Build the training and evaluation sets that cfg.data describes (once per process).

    progress(done, total, what), when given, is called during scans, verification and statistics.
    """
    kind = cfg.data.dataset
    if kind == "synthetic":
        return _build_synthetic(cfg, progress)
    if kind == "prepared":
        return _build_prepared(cfg, progress)
    return _build_folder(cfg, cache_dir, progress)


def dataset_fingerprint(cfg: Config, mode: str = "full") -> str:
    """Identity of the data, to notice a data set that changed between epochs or before a resume.

    "full": every file's path, size and mtime; "sample": every path plus the size and mtime of
    data.check_sample files (cheap enough to run between epochs). Synthetic sets hash their settings,
    prepared sets their manifest and shard files, in both modes.
    """
    if mode not in ("full", "sample"):
        raise ValueError(f"fingerprint mode {mode!r} is not full or sample")
    d = cfg.data
    if d.dataset == "synthetic":
        return synthetic_fingerprint(cfg)
    if d.dataset == "prepared":
        return prepared_fingerprint(d.root)
    if mode == "full":
        return full_fingerprint(scan(d.root, stat=True))
    return sample_fingerprint(scan(d.root, stat=False), d.check_sample)
