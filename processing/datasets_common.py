"""What every reader shares: skip counting, safe image loading, map-style/streaming wrappers.

A reader is a *builder* (raw row -> example for `LCLDataCollator`, or `None` to skip it) applied to a
`datasets.Dataset` (map-style) or `datasets.IterableDataset` (streaming) of raw rows:

- streaming: `IterableDataset.map(builder)` then a filter that drops skipped rows;
- map-style: `SkippingDataset`, a torch `Dataset` over the `datasets.Dataset` that, like the reference,
  replaces a skipped row by the next valid one (so indices stay valid and no batch shrinks).

Bad data never raises in the middle of an epoch: missing, truncated or undecodable images and rows left
without images are skipped and counted in the builder's `stats` (per process: each DataLoader worker
counts its own), and logged with the running count at 1, 2, 4, 8, ... occurrences.
"""

import io
import os
import random
from collections import Counter

import PIL.Image
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class SkipStats:
    """Counts of skipped items by reason, logged at powers of two so that a bad shard cannot flood the log."""

    def __init__(self, owner: str):
        self.owner = owner
        self.counts = Counter()

    def record(self, reason: str, detail: str | None = None) -> None:
        self.counts[reason] += 1
        count = self.counts[reason]
        if count & (count - 1) == 0:
            logger.warning(
                f"{self.owner}: {count} skipped so far ({reason}){f'; latest: {detail}' if detail else ''}."
            )
        else:
            logger.debug(f"{self.owner}: skipped ({reason}) {detail or ''}")

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __repr__(self) -> str:
        return f"SkipStats({self.owner!r}, {dict(self.counts)})"


def load_image(source, image_dir: str | os.PathLike | None = None) -> PIL.Image.Image:
    """Open and fully decode an image as RGB (the reference's `Image.open(path).convert("RGB")`).

    `source`: a path (relative to `image_dir` if given), raw bytes, a `{"bytes", "path"}` dict (a
    `datasets.Image(decode=False)` cell) or a PIL image. Raises on any failure; readers catch and count.
    """
    if isinstance(source, PIL.Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        image = PIL.Image.open(io.BytesIO(source))
    elif isinstance(source, dict):
        if source.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(source["bytes"]))
        elif source.get("path"):
            return load_image(source["path"], image_dir)
        else:
            raise ValueError("image cell has neither bytes nor path")
    elif isinstance(source, (str, os.PathLike)):
        path = os.path.join(image_dir, source) if image_dir is not None else source
        with PIL.Image.open(path) as opened:
            return opened.convert("RGB")  # convert() decodes everything, so truncation fails here
    else:
        raise TypeError(f"cannot load an image from {type(source).__name__}")
    return image.convert("RGB")


def try_load_image(source, stats: SkipStats, image_dir=None):
    """`load_image`, or `None` with the failure counted as `missing_image` / `bad_image`."""
    try:
        return load_image(source, image_dir)
    except FileNotFoundError:
        stats.record("missing_image", _describe(source, image_dir))
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... on bad files
        stats.record("bad_image", f"{_describe(source, image_dir)}: {type(error).__name__}: {error}")
    return None


def _describe(source, image_dir) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.path.join(image_dir, source) if image_dir is not None else str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"<{type(source).__name__}>"


class SkippingDataset(torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` through a builder; a skipped row is replaced by the next valid one.

    Args:
        source: A `datasets.Dataset` (or any sequence) of raw rows.
        builder: Callable `(row, key=None) -> example | None`, with a `stats` `SkipStats`; `key` is
            `(epoch, row index)`, for seeding the builder's random choices per row (`row_rng`).
        max_attempts: Consecutive skipped rows tolerated before giving up with a `RuntimeError` (the data is
            then broken beyond a bad file here and there).
    """

    def __init__(self, source, builder, max_attempts: int = 100):
        self.source = source
        self.builder = builder
        self.max_attempts = max_attempts
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The builder's random choices for a row are a function of (its seed, rank, epoch, row index), so a
        resumed run sees the rows as the interrupted one did; `LCLTrainer` calls this at every epoch."""
        self.epoch = epoch

    @property
    def stats(self) -> SkipStats:
        return self.builder.stats

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(self.max_attempts, len(self.source))):
            row_index = (index + attempt) % len(self.source)
            example = self.builder(self.source[row_index], key=(self.epoch, row_index))
            if example is not None:
                return example
        raise RuntimeError(
            f"{self.max_attempts} consecutive rows from index {index} were skipped ({self.stats.as_dict()}): "
            "check the data paths."
        )


def apply_builder(raw, builder, streaming: bool, max_attempts: int = 100):
    """Map-style `SkippingDataset` or a streaming `IterableDataset` of the builder's examples."""
    if not streaming:
        return SkippingDataset(raw, builder, max_attempts=max_attempts)
    columns = list(raw.column_names) if raw.column_names is not None else None
    mapped = raw.map(_StreamingBuilder(builder), remove_columns=columns)
    return mapped.filter(lambda example: not example.get(SKIPPED_KEY, False))


SKIPPED_KEY = "_lcl_skipped"


class _StreamingBuilder:
    """`IterableDataset.map` needs a dict for every row: skipped rows become `{SKIPPED_KEY: True}`."""

    def __init__(self, builder):
        self.builder = builder

    def __call__(self, row: dict) -> dict:
        example = self.builder(row)
        return {SKIPPED_KEY: True} if example is None else example


def split_for_node(dataset, rank: int | None, world_size: int | None):
    """Disjoint part of `dataset` for this process (`datasets.distributed.split_dataset_by_node`).

    Streaming datasets get whole shards when the shard count divides `world_size`, else every
    `world_size`-th example; map-style ones a contiguous block.
    """
    if world_size is None or world_size <= 1:
        return dataset
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank or 0, world_size=world_size)


def worker_rng(seed: int | None, state: dict) -> random.Random:
    """A `random.Random` per process: seeded from `seed` and, in a DataLoader worker, the worker's seed
    (which PyTorch changes every epoch). `state` caches it on the caller."""
    worker = torch.utils.data.get_worker_info()
    owner = (worker.id, worker.seed) if worker is not None else None
    if state.get("owner", "unset") != owner:
        state["rng"] = random.Random(None if seed is None else hash((seed, process_rank(), owner[1] if owner else 0)))
        state["owner"] = owner
    return state["rng"]


def row_rng(seed: int | None, key: tuple | None, state: dict) -> random.Random:
    """The generator of a builder's random choices for one row: a function of `(seed, rank, *key)` when both
    are given (map-style rows: `key` is (epoch, row index), reproducible and resumable), else the
    per-worker `worker_rng` (streaming rows have no index)."""
    if seed is None or key is None:
        return worker_rng(seed, state)
    return random.Random(hash((seed, process_rank(), *key)))


def process_rank() -> int:
    """This process's rank in `torch.distributed` (0 when not distributed)."""
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


__all__ = [
    "SkipStats", "SkippingDataset", "load_image", "try_load_image", "apply_builder", "split_for_node", "row_rng",
]
