"""Image-caption pairs -> `{"image": PIL image, "text": caption}`.

Sources: any `datasets` dataset with an image column and a text column (`load_pairs`), an `imagefolder`
with captions in `metadata.jsonl` / `metadata.csv` (`load_image_folder_pairs`), or webdataset tar
shards such as LAION's (`load_webdataset_pairs`: `<key>.jpg` + `<key>.txt`). Images are decoded here, so
a broken file is skipped and counted rather than raised while `datasets` formats the row.
"""

import os

from datasets import Dataset, Image, IterableDataset, load_dataset

from .datasets_common import SkipStats, apply_builder, row_rng, split_for_node, try_load_image
from .datasets_mmc4 import expand_paths
from .datasets_obelics import undecoded_images
from .processing_lcl import check_image_first_prob

IMAGE_COLUMN_NAMES = ("image", "jpg", "jpeg", "png", "webp", "img")
TEXT_COLUMN_NAMES = ("text", "caption", "txt", "captions")


class PairBuilder:
    """Raw row -> `{"image": ..., "text": ...}`, or `None` for a missing/broken image or caption (counted).

    With `image_first_prob`, each example also gets `"image_first"` (its layout), drawn as the MMC4 reader
    draws its choices (`datasets_common.row_rng`: from `(seed, rank, epoch, row index)` for map-style rows),
    so that the layouts survive an interrupted and resumed run; without it the collator draws them.
    """

    def __init__(
        self,
        image_column: str = "image",
        text_column: str = "text",
        image_dir=None,
        image_first_prob: float | None = None,
        seed: int | None = None,
    ):
        if image_first_prob is not None:
            check_image_first_prob(image_first_prob)
        self.image_column = image_column
        self.text_column = text_column
        self.image_dir = image_dir
        self.image_first_prob = image_first_prob
        self.seed = seed
        self.stats = SkipStats("pairs")
        self._rng_state = {}

    def __call__(self, row: dict, key: tuple | None = None) -> dict | None:
        text = row.get(self.text_column)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            self.stats.record("missing_text", f"{self.text_column}={type(text).__name__}")
            return None
        if row.get(self.image_column) is None:
            self.stats.record("missing_image", f"{self.image_column} is null")
            return None
        image = try_load_image(row[self.image_column], self.stats, self.image_dir)
        if image is None:
            return None
        example = {"image": image, "text": text}
        if self.image_first_prob is not None:
            example["image_first"] = row_rng(self.seed, key, self._rng_state).random() < self.image_first_prob
        return example


def find_column(dataset, candidates: tuple[str, ...], kind: str, want_image: bool) -> str:
    """The first column that is an `Image` feature (for images) or has one of the usual names."""
    names = list(dataset.column_names or [])
    if want_image and dataset.features is not None:
        for name in names:
            if isinstance(dataset.features[name], Image):
                return name
    for name in candidates:
        if name in names:
            return name
    raise ValueError(f"Cannot find the {kind} column among {names}; pass {kind}_column=.")


def load_pairs(
    dataset,
    image_column: str | None = None,
    text_column: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    max_attempts: int = 100,
    builder: PairBuilder | None = None,
    image_first_prob: float | None = None,
    seed: int | None = None,
):
    """Pairs from a `datasets.Dataset` (map-style) or `IterableDataset` (streaming) with image and text columns.

    `image_first_prob` / `seed`: give every pair its layout here (see `PairBuilder`) instead of in the collator.
    """
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"load_pairs expects a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    if builder is None:
        image_column = image_column or find_column(dataset, IMAGE_COLUMN_NAMES, "image", want_image=True)
        text_column = text_column or find_column(dataset, TEXT_COLUMN_NAMES, "text", want_image=False)
        builder = PairBuilder(image_column, text_column, image_first_prob=image_first_prob, seed=seed)
    raw = undecoded_images(dataset, builder.image_column)
    raw = split_for_node(raw, rank, world_size)
    return apply_builder(raw, builder, isinstance(dataset, IterableDataset), max_attempts)


def load_image_folder_pairs(data_dir: str | os.PathLike, text_column: str = "text", streaming: bool = False, **kwargs):
    """Pairs from an `imagefolder` whose `metadata.jsonl` / `metadata.csv` has `file_name` and `text_column`."""
    dataset = load_dataset("imagefolder", data_dir=str(data_dir), split="train", streaming=streaming)
    return load_pairs(dataset, text_column=text_column, **kwargs)


def load_webdataset_pairs(shards, streaming: bool = True, **kwargs):
    """Pairs from webdataset `.tar` shards (`<key>.jpg|png|webp` + `<key>.txt`); streaming by default."""
    files = expand_paths(shards)
    dataset = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=streaming)
    return load_pairs(dataset, **kwargs)


__all__ = ["PairBuilder", "load_pairs", "load_image_folder_pairs", "load_webdataset_pairs", "find_column"]
