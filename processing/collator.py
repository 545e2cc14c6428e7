"""`LCLDataCollator`: a batch of dataset examples -> model inputs, through `LCLProcessor`.

Examples (what the readers of this package yield):

- `{"segments": [str | image, ...]}`: an interleaved document;
- `{"image": image, "text": caption}`: an image-caption pair; an optional `"image_first"` (bool) fixes its
  layout instead of drawing it;
- `{"text": prompt}`: text alone.

It is the processor's own code path (`build_sequences` + `batch_sequences`), plus what only makes sense
for a training stream: a seedable image-first draw that differs across DataLoader workers and ranks, and
dropping documents that truncation left without any image (the reference skips them too).
"""

import numpy as np
import torch
from transformers import BatchFeature
from transformers.utils import logging

from .datasets_common import SkipStats, process_rank
from .processing_lcl import Document, LCLProcessor, Pair, Prompt

logger = logging.get_logger(__name__)


class LCLDataCollator:
    """Collate examples for `Trainer` / `DataLoader(collate_fn=...)`.

    Args:
        processor (`LCLProcessor`): Lays out and pads the batch.
        image_first_prob (`float`, *optional*): Probability of the image-first layout for pairs
            (defaults to the processor's; 0 for deterministic evaluation batches).
        seed (`int`, *optional*): Seeds the image-first draws. In a DataLoader worker the draws are seeded
            from `seed` and the worker's own seed (which PyTorch changes every epoch), so workers differ.
            `None` uses PyTorch's global generator.
        pad_to_multiple_of (`int`, *optional*): See `LCLProcessor.__call__`.
        drop_documents_without_images (`bool`, defaults to `True`): Drop interleaved documents whose every
            image was cut by truncation (counted in `stats`), unless that would empty the batch.
        image_transform (`callable`, *optional*): Applied to every PIL image before the image processor,
            e.g. `RandomResizedCrop(224)` for training-time augmentation.
        return_image_counts (`bool`, defaults to `True`): Keep `image_counts` (images per sample) in the batch.

    `stats` counts `skipped_examples` (examples whose payload is `None`) and `documents_without_images`.
    """

    def __init__(
        self,
        processor: LCLProcessor,
        image_first_prob: float | None = None,
        seed: int | None = None,
        pad_to_multiple_of: int | None = None,
        drop_documents_without_images: bool = True,
        image_transform=None,
        return_image_counts: bool = True,
    ):
        self.processor = processor
        self.image_first_prob = image_first_prob
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.drop_documents_without_images = drop_documents_without_images
        self.image_transform = image_transform
        self.return_image_counts = return_image_counts
        self.stats = SkipStats("LCLDataCollator")
        self._generator = None
        self._generator_owner = None

    def __call__(self, examples: list[dict]) -> BatchFeature:
        samples = [sample for sample in map(self._to_sample, examples) if sample is not None]
        if not samples:
            raise ValueError(f"All {len(examples)} examples of the batch were skipped (their payload is None).")
        sequences = self.processor.build_sequences(samples, self.image_first_prob, self._draw_generator())
        sequences = self._drop_imageless_documents(samples, sequences)
        batch = self.processor.batch_sequences(sequences, pad_to_multiple_of=self.pad_to_multiple_of)
        if not self.return_image_counts:
            batch.pop("image_counts", None)
        return batch

    def _to_sample(self, example: dict):
        if not isinstance(example, dict):
            raise TypeError(f"Examples must be dicts, got {type(example).__name__}.")
        if "segments" in example:
            segments = example["segments"]
            if segments is None:
                self.stats.record("skipped_examples")
                return None
            return Document([self._transform(s) if not isinstance(s, str) else s for s in segments])
        if "image" in example:
            if example["image"] is None or example.get("text") is None:
                self.stats.record("skipped_examples")
                return None
            image_first = example.get("image_first")
            if image_first is not None and not isinstance(image_first, (bool, np.bool_)):
                raise TypeError(f"An example's 'image_first' must be a bool or None, got {image_first!r}.")
            return Pair(self._transform(example["image"]), example["text"], image_first)
        if "text" in example:
            return Prompt(example["text"])
        raise ValueError(
            f"Example has keys {sorted(example)}; expected 'segments', or 'image' and 'text', or 'text'. With "
            "transformers' Trainer, set TrainingArguments(remove_unused_columns=False): it otherwise drops these "
            "keys because the model's forward does not take them."
        )

    def _transform(self, image):
        return self.image_transform(image) if self.image_transform is not None else image

    def _drop_imageless_documents(self, samples, sequences):
        if not self.drop_documents_without_images:
            return sequences
        lost = [
            isinstance(sample, Document) and not seq.images and seq.num_truncated_images > 0
            for sample, seq in zip(samples, sequences)
        ]
        if not any(lost) or all(lost):
            # All lost: keep them as text-only sequences rather than return an empty batch mid-epoch.
            return sequences
        for _ in range(sum(lost)):
            self.stats.record("documents_without_images")
        return [seq for seq, is_lost in zip(sequences, lost) if not is_lost]

    def _draw_generator(self) -> torch.Generator | None:
        """One generator per process: the main process, or each DataLoader worker (re-seeded per epoch)."""
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        owner = (worker.id, worker.seed) if worker is not None else None
        if self._generator is None or owner != self._generator_owner:
            seed = hash((self.seed, process_rank(), worker.seed if worker is not None else 0)) % (2**63)
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_owner = owner
        return self._generator


__all__ = ["LCLDataCollator"]
