"""MMC4 interleaved documents: `.jsonl` / `.jsonl.zip` shards + an image folder -> `{"segments": [...]}`.

A document has `text_list` (sentences) and `image_info` (`image_name`, `matched_text_index`,
`matched_sim`, ...). The recipe of the reference (`MMC4InterleavedDataset`):

1. drop images whose `matched_sim` is below 0.24;
2. keep at most one image per sentence (a random one among those matched to it);
3. keep the first 6 images (in sentence order);
4. load them (a missing or broken file is dropped and counted); a document left without images is
   skipped and counted;
5. put each image before or after its sentence (probability 0.5 each); sentences join with spaces.

Truncation to the context length (and dropping documents whose images were all cut) happens in
`LCLProcessor` / `LCLDataCollator`, which see the token count.
"""

import glob
import io
import json
import os
import zipfile
from collections.abc import Iterator

from datasets import Dataset, Features, IterableDataset, List, Value
from transformers.utils import logging

from .datasets_common import SkipStats, apply_builder, row_rng, split_for_node, try_load_image
from .processing_lcl import check_image_first_prob

logger = logging.get_logger(__name__)

MMC4_FEATURES = Features(
    {
        "text_list": List(Value("string")),
        "image_info": List(
            {"image_name": Value("string"), "matched_text_index": Value("int64"), "matched_sim": Value("float64")}
        ),
    }
)


class MMC4DocumentBuilder:
    """Raw MMC4 row -> `{"segments": [...]}` with loaded PIL images, or `None` (skipped, counted in `stats`).

    Args:
        image_dir: Folder holding the images named by `image_name`.
        sim_threshold: Images with `matched_sim` below this are dropped (0.24).
        max_images: At most this many images per document (6).
        image_first_prob: Probability that an image goes before its sentence (0.5).
        one_image_per_sentence: Keep one random image per sentence (True).
        seed: Seeds the random choices. Map-style rows draw them from `(seed, rank, epoch, row index)`:
            reproducible, and the same after resuming from a checkpoint; streaming rows from a generator
            per DataLoader worker and epoch (see `datasets_common.row_rng`).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        sim_threshold: float = 0.24,
        max_images: int = 6,
        image_first_prob: float = 0.5,
        one_image_per_sentence: bool = True,
        seed: int | None = None,
    ):
        check_image_first_prob(image_first_prob)
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}.")
        self.image_dir = image_dir
        self.sim_threshold = sim_threshold
        self.max_images = max_images
        self.image_first_prob = image_first_prob
        self.one_image_per_sentence = one_image_per_sentence
        self.seed = seed
        self.stats = SkipStats("MMC4")
        self._rng_state = {}

    def __call__(self, row: dict, key: tuple | None = None) -> dict | None:
        rng = row_rng(self.seed, key, self._rng_state)
        sentences = row["text_list"]
        matched = self._select_images(row["image_info"], len(sentences), rng)
        if not matched:
            self.stats.record("no_matched_images")
            return None
        placed = []  # (sentence index, image, before the sentence?)
        for sentence_index, image_name in matched:
            image = try_load_image(image_name, self.stats, self.image_dir)
            if image is not None:
                placed.append((sentence_index, image, rng.random() < self.image_first_prob))
        if not placed:
            self.stats.record("no_loadable_images")
            return None
        return {"segments": _interleave(sentences, placed)}

    def _select_images(self, image_info: list[dict], num_sentences: int, rng) -> list[tuple[int, str]]:
        """Steps 1-3: `(sentence index, image name)` sorted by sentence, filtered, deduplicated, capped."""
        candidates = []
        for info in image_info:
            index = info["matched_text_index"]
            if info["matched_sim"] < self.sim_threshold:
                continue
            if not 0 <= index < num_sentences:
                self.stats.record("bad_text_index", f"{info['image_name']} -> sentence {index}")
                continue
            candidates.append((index, info["image_name"]))
        candidates.sort(key=lambda item: item[0])  # stable: ties keep document order, as the reference
        if self.one_image_per_sentence:
            by_sentence = {}
            for index, name in candidates:
                by_sentence.setdefault(index, []).append(name)
            candidates = [(index, names[rng.randrange(len(names))]) for index, names in by_sentence.items()]
        return candidates[: self.max_images]


def _interleave(sentences: list[str], placed: list[tuple]) -> list:
    """Sentences with images before/after them; consecutive sentences joined by a space."""
    before, after = {}, {}
    for index, image, image_first in placed:
        (before if image_first else after)[index] = image
    segments, text_run = [], []

    def flush():
        if text_run:
            segments.append(" ".join(text_run))
            text_run.clear()

    for index, sentence in enumerate(sentences):
        if index in before:
            flush()
            segments.append(before[index])
        text_run.append(sentence)
        if index in after:
            flush()
            segments.append(after[index])
    flush()
    return segments


def iter_mmc4_rows(shards: list[str], signature: str = "") -> Iterator[dict]:
    """Raw rows of MMC4 shards (`.jsonl` or `.zip` of `.jsonl`), projected on `MMC4_FEATURES`.

    Lines that are not JSON or lack `text_list` / `image_info` are skipped and logged; `signature` only
    makes the `datasets` cache notice changed files.
    """
    stats = SkipStats("MMC4 reader")
    for shard in shards:
        for line in _shard_lines(shard):
            try:
                document = json.loads(line)
            except json.JSONDecodeError as error:
                stats.record("bad_json", f"{shard}: {error}")
                continue
            row = _project(document)
            if row is None:
                stats.record("malformed_document", shard)
                continue
            yield row


def _shard_lines(shard: str) -> Iterator[str]:
    if zipfile.is_zipfile(shard):
        with zipfile.ZipFile(shard) as archive:
            for member in archive.namelist():
                if member.endswith("/"):
                    continue
                with archive.open(member) as handle:
                    yield from (line for line in io.TextIOWrapper(handle, encoding="utf-8") if line.strip())
    else:
        with open(shard, encoding="utf-8") as handle:
            yield from (line for line in handle if line.strip())


def _project(document) -> dict | None:
    if not isinstance(document, dict):
        return None
    sentences, image_info = document.get("text_list"), document.get("image_info")
    if not isinstance(sentences, list) or not isinstance(image_info, list):
        return None
    if not all(isinstance(sentence, str) for sentence in sentences):
        return None
    infos = []
    for info in image_info:
        try:
            infos.append(
                {
                    "image_name": str(info["image_name"]),
                    "matched_text_index": int(info["matched_text_index"]),
                    "matched_sim": float(info["matched_sim"]),
                }
            )
        except (KeyError, TypeError, ValueError):
            continue  # an image entry without its match cannot be placed
    return {"text_list": sentences, "image_info": infos}


def expand_paths(paths) -> list[str]:
    """A path, a glob, or a list of them -> sorted list of files (error if none)."""
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        files.extend(matches)
    missing = [path for path in files if not os.path.isfile(path)]
    if not files or missing:
        raise FileNotFoundError(f"No such shard file(s): {missing or patterns}")
    return files


def _signature(files: list[str]) -> str:
    return ";".join(f"{path}:{os.path.getsize(path)}:{os.stat(path).st_mtime_ns}" for path in files)


def load_mmc4(
    shards,
    image_dir: str | os.PathLike | None = None,
    streaming: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    cache_dir: str | None = None,
    max_attempts: int = 100,
    builder: MMC4DocumentBuilder | None = None,
    **builder_kwargs,
):
    """MMC4 examples `{"segments": [...]}` for `LCLDataCollator`.

    Args:
        shards: `.jsonl` / `.jsonl.zip` files (paths, globs or a list).
        image_dir: The image folder.
        streaming: `datasets.IterableDataset` (one shard per file, skipped rows filtered out) instead of a
            map-style dataset (`SkippingDataset` over a cached `datasets.Dataset`).
        rank, world_size: Give this process a disjoint part (`split_dataset_by_node`).
        cache_dir: `datasets` cache for the map-style table.
        builder: An `MMC4DocumentBuilder` to use (keep a handle on it to read its `stats`); else one is
            made from `image_dir` and `builder_kwargs` (`sim_threshold`, `max_images`, `image_first_prob`,
            `one_image_per_sentence`, `seed`).
    """
    if builder is None:
        if image_dir is None:
            raise ValueError("load_mmc4 needs image_dir (or a builder).")
        builder = MMC4DocumentBuilder(image_dir, **builder_kwargs)
    files = expand_paths(shards)
    gen_kwargs = {"shards": files, "signature": _signature(files)}
    if streaming:
        raw = IterableDataset.from_generator(iter_mmc4_rows, features=MMC4_FEATURES, gen_kwargs=gen_kwargs)
    else:
        raw = Dataset.from_generator(
            iter_mmc4_rows, features=MMC4_FEATURES, gen_kwargs=gen_kwargs, cache_dir=cache_dir
        )
    raw = split_for_node(raw, rank, world_size)
    return apply_builder(raw, builder, streaming, max_attempts)


__all__ = ["MMC4DocumentBuilder", "MMC4_FEATURES", "iter_mmc4_rows", "load_mmc4", "expand_paths"]
