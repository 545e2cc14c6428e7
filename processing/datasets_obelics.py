"""OBELICS-style documents: parallel `texts` / `images` lists -> `{"segments": [...]}`.

At every position exactly one of `texts[i]` and `images[i]` is null. An image cell may be a PIL image,
bytes, a `{"bytes", "path"}` dict (`datasets.Image`), or a path relative to `image_dir`. The public
OBELICS release stores image *URLs*: download them first (e.g. with img2dataset) and give the local
paths; a URL is not fetched here and counts as a missing image.
"""

import os

from datasets import Dataset, Image, IterableDataset, List, load_dataset

from .datasets_common import SkipStats, apply_builder, split_for_node, try_load_image
from .datasets_mmc4 import expand_paths


class ObelicsDocumentBuilder:
    """Raw row -> `{"segments": [...]}` with loaded images, or `None` (skipped, counted in `stats`).

    Args:
        image_dir: Folder that relative image paths are resolved against.
        max_images: Keep at most this many images per document (`None`: all).
        text_column, image_column: Names of the two parallel lists.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike | None = None,
        max_images: int | None = None,
        text_column: str = "texts",
        image_column: str = "images",
    ):
        self.image_dir = image_dir
        self.max_images = max_images
        self.text_column = text_column
        self.image_column = image_column
        self.stats = SkipStats("OBELICS")

    def __call__(self, row: dict, key: tuple | None = None) -> dict | None:
        texts, images = row.get(self.text_column), row.get(self.image_column)
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            self.stats.record("malformed_document", "texts/images are not lists of the same length")
            return None
        segments, num_images = [], 0
        for position, (text, image) in enumerate(zip(texts, images)):
            if (text is None) == (image is None):
                self.stats.record(
                    "malformed_document", f"position {position} has {'both' if text is not None else 'neither'}"
                )
                return None
            if text is not None:
                segments.append(text)
            elif self.max_images is None or num_images < self.max_images:
                loaded = try_load_image(image, self.stats, self.image_dir)
                if loaded is not None:
                    segments.append(loaded)
                    num_images += 1
        if num_images == 0:
            self.stats.record("no_loadable_images")
            return None
        return {"segments": segments}


def undecoded_images(dataset, column: str):
    """Cast an image (or list-of-images) column to `decode=False`: decoding then happens in the builder,
    where a broken file is counted instead of raising while `datasets` formats the row."""
    features = dataset.features
    if features is None or column not in features:
        return dataset
    feature = features[column]
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column(column, Image(decode=False))
    if isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
        return dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def load_obelics(
    source,
    image_dir: str | os.PathLike | None = None,
    streaming: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    max_attempts: int = 100,
    builder: ObelicsDocumentBuilder | None = None,
    **builder_kwargs,
):
    """OBELICS examples `{"segments": [...]}` for `LCLDataCollator`.

    Args:
        source: A `datasets.Dataset` / `IterableDataset`, or parquet / json(l) files (paths or globs).
        image_dir, builder_kwargs: `ObelicsDocumentBuilder` options (or pass `builder=`).
        streaming, rank, world_size, max_attempts: As in `load_mmc4`.
    """
    builder = builder or ObelicsDocumentBuilder(image_dir, **builder_kwargs)
    if isinstance(source, (Dataset, IterableDataset)):
        raw = source
        streaming = isinstance(source, IterableDataset)
    else:
        files = expand_paths(source)
        kind = "parquet" if files[0].endswith(".parquet") else "json"
        raw = load_dataset(kind, data_files={"train": files}, split="train", streaming=streaming)
    raw = undecoded_images(raw, builder.image_column)
    raw = split_for_node(raw, rank, world_size)
    return apply_builder(raw, builder, streaming, max_attempts)


__all__ = ["ObelicsDocumentBuilder", "load_obelics", "undecoded_images"]
