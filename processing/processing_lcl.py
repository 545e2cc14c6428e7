"""`LCLProcessor`: documents, image-caption pairs and prompts -> model inputs, as LCL was trained.

Layouts (N = `num_image_tokens`, block = `<soi> <img>×N <eoi>`):

- interleaved document: `<sot> text block text ... <eot>`, in document order;
- pair, image first (probability `image_first_prob`): `block caption <eot>` (no `<sot>`);
- pair, text first: `<sot> caption block` (no `<eot>`); the caption is cut to `max_length - N - 4` tokens;
- prompt (text alone): `<sot> prompt <eot>`, for `LCLModel.get_text_features`.

Truncation keeps `max_length - 1` tokens and ends with `<eot>`. If that cut falls inside an image block,
the sequence is cut at the block's `<soi>` instead (then ends with `<eot>` there), and that image and every
later one are dropped from `pixel_values`: an image block is never partial.

Batches are padded to the longest sequence (optionally rounded up to `pad_to_multiple_of`, never past
`max_length`) with `pad_token_id` (0, as the reference); the model reads padding from `attention_mask`.
"""

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import is_valid_image

IMAGE_MARKER = "<image>"


@dataclass
class Document:
    """An interleaved document: text segments (`str`) and images in reading order."""

    segments: list


@dataclass
class Pair:
    """An image with its caption. `image_first` fixes the layout of this pair; `None` draws it with the
    processor's `image_first_prob` (a dataset that decides it per index makes the layout reproducible,
    e.g. across an interrupted and resumed run)."""

    image: Any
    text: str
    image_first: bool | None = None


@dataclass
class Prompt:
    """Text alone (zero-shot prompts, text-only documents)."""

    text: str


@dataclass
class LCLSequence:
    """One laid-out sample: its token ids and the images whose blocks it holds, in order."""

    input_ids: list[int]
    images: list = field(default_factory=list)
    # Images of the sample that truncation dropped (their blocks did not fit in `max_length`).
    num_truncated_images: int = 0
    # A prompt (text alone, for `get_text_features`) rather than a document or a pair.
    is_prompt: bool = False


class LCLProcessor(ProcessorMixin):
    r"""
    Builds LCL inputs: `input_ids`, `attention_mask`, `pixel_values` (all kept images of the batch, in
    document order) and `image_counts` (images per sample).

    Args:
        image_processor (`LCLImageProcessor`):
            Turns images into `pixel_values`.
        tokenizer (`LCLTokenizer`):
            Must define `bos_token`, `eos_token`, `image_token`, `image_start_token`, `image_end_token`.
        num_image_tokens (`int`, defaults to 196):
            N, the `<img>` placeholders per image (`LCLConfig.num_image_tokens`).
        max_length (`int`, defaults to 280):
            Context length (`text_config.max_position_embeddings`).
        image_first_prob (`float`, defaults to 0.5):
            Default probability that a pair is laid out image first (captioning) rather than text first.
        pad_token_id (`int`, defaults to 0):
            Id written in padded positions (the reference pads with 0).
        image_marker (`str`, defaults to `"<image>"`):
            Where an image goes in `text` given together with `images` (interleaved input as text).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 196,
        max_length: int = 280,
        image_first_prob: float = 0.5,
        pad_token_id: int = 0,
        image_marker: str = IMAGE_MARKER,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, **kwargs)
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}.")
        if max_length < num_image_tokens + 4:
            raise ValueError(
                f"max_length ({max_length}) leaves no room for an image block and a caption: it must be at least "
                f"num_image_tokens + 4 = {num_image_tokens + 4} (<sot>/<eot>, <soi>, {num_image_tokens} <img>, <eoi>)."
            )
        check_image_first_prob(image_first_prob)
        if not image_marker:
            raise ValueError("image_marker must be a non-empty string.")
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_first_prob = image_first_prob
        self.pad_token_id = pad_token_id
        self.image_marker = image_marker
        self._token_ids = _special_ids_of(tokenizer)

    # ------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------

    def special_token_ids(self) -> dict[str, int]:
        """The `LCLConfig` keyword arguments that match this processor's ids."""
        ids = self._token_ids
        return {
            "image_token_id": ids["image"],
            "image_start_token_id": ids["image_start"],
            "image_end_token_id": ids["image_end"],
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": self.pad_token_id,
        }

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        documents: list | None = None,
        image_first_prob: float | None = None,
        generator: torch.Generator | None = None,
        padding: bool | str = "longest",
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = "pt",
        images_kwargs: dict | None = None,
    ) -> BatchFeature:
        """
        Args:
            images: Images for pairs (one per caption in `text`), for the `image_marker`s of `text`
                (a flat list in order, or one list per text), or alone (then only `pixel_values`).
            text: Captions (with `images`), texts with `image_marker`s (with `images`), or prompts.
            documents: A document or a list of documents; a document is a list of segments, each a `str`
                or an image (PIL image, array or tensor).
            image_first_prob: Probability of the image-first layout for pairs; defaults to the processor's.
                0 gives the deterministic text-first layout used at evaluation.
            generator: `torch.Generator` for the image-first draws (global RNG if `None`).
            padding: `"longest"`/`True` (dynamic), `"max_length"`, or `False`/`"do_not_pad"`.
            pad_to_multiple_of: Round the padded length up to a multiple of this (capped at `max_length`).
            return_tensors: `"pt"` (default), `"np"` or `None` (lists).
            images_kwargs: Extra arguments for the image processor.

        Returns:
            `BatchFeature` with `input_ids` `(batch_size, seq_len)`, `attention_mask` `(batch_size, seq_len)`,
            `image_counts` `(batch_size,)` (not for prompts alone) and, if any image is kept, `pixel_values`
            `(num_images, 3, height, width)` in document order. Images alone give `pixel_values` only.
        """
        if documents is not None and (text is not None or images is not None):
            raise ValueError("Pass either documents= or text=/images=, not both.")
        if documents is None and text is None:
            if images is None:
                raise ValueError("Nothing to process: pass documents=, text= and/or images=.")
            return self.image_processor(images, return_tensors=return_tensors, **(images_kwargs or {}))
        samples = self._samples_from_documents(documents) if documents is not None else self._samples(text, images)
        sequences = self.build_sequences(samples, image_first_prob=image_first_prob, generator=generator)
        return self.batch_sequences(
            sequences,
            padding=padding,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors=return_tensors,
            images_kwargs=images_kwargs,
        )

    def build_sequences(
        self, samples: list, image_first_prob: float | None = None, generator: torch.Generator | None = None
    ) -> list[LCLSequence]:
        """Lay out `Document` / `Pair` / `Prompt` samples as token ids (not padded, images not processed)."""
        image_first_prob = self.image_first_prob if image_first_prob is None else image_first_prob
        check_image_first_prob(image_first_prob)
        texts, slots = self._collect_texts(samples)
        token_ids = self._tokenize(texts)
        draws = self._image_first_draws(samples, image_first_prob, generator)
        sequences = []
        for sample, sample_slots, image_first in zip(samples, slots, draws):
            if isinstance(sample, Document):
                sequences.append(self._layout_document(sample, [token_ids[i] for i in sample_slots]))
            elif isinstance(sample, Pair):
                sequences.append(self._layout_pair(sample, token_ids[sample_slots[0]], image_first))
            else:
                sequences.append(self._layout_prompt(token_ids[sample_slots[0]]))
        return sequences

    def batch_sequences(
        self,
        sequences: list[LCLSequence],
        padding: bool | str = "longest",
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = "pt",
        images_kwargs: dict | None = None,
    ) -> BatchFeature:
        """Pad `sequences` into a batch and process their images (in order) into `pixel_values`."""
        if not sequences:
            raise ValueError("Cannot build a batch from zero sequences.")
        input_ids, attention_mask = self._pad(
            [seq.input_ids for seq in sequences], padding, pad_to_multiple_of, return_tensors
        )
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not all(seq.is_prompt for seq in sequences):
            # Prompt-only batches leave it out, so that `model.get_text_features(**batch)` works.
            data["image_counts"] = [len(seq.images) for seq in sequences]
        images = [image for seq in sequences for image in seq.images]
        if images:
            pixel_values = self.image_processor(images, return_tensors=None, **(images_kwargs or {}))["pixel_values"]
            data["pixel_values"] = np.stack(pixel_values) if return_tensors else pixel_values
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # ------------------------------------------------------------------------------------------
    # Inputs -> samples
    # ------------------------------------------------------------------------------------------

    def _samples_from_documents(self, documents) -> list[Document]:
        if not isinstance(documents, (list, tuple)):
            raise TypeError(
                f"documents must be a list of segments or a list of documents, got {type(documents).__name__}."
            )
        if not documents:
            raise ValueError("documents is empty.")
        if all(isinstance(doc, (list, tuple)) for doc in documents):
            batch = documents
        elif any(isinstance(doc, (list, tuple)) for doc in documents):
            raise TypeError("documents mixes nested lists and segments: pass one document or a list of documents.")
        else:
            batch = [documents]
        return [Document(_check_segments(doc, index)) for index, doc in enumerate(batch)]

    def _samples(self, text, images) -> list:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings.")
        num_markers = [t.count(self.image_marker) for t in texts]
        if any(num_markers):
            return self._documents_from_marked_text(texts, images, num_markers)
        if images is None:
            return [Prompt(t) for t in texts]
        flat = _flat_images(images)
        if len(flat) != len(texts):
            raise ValueError(
                f"Got {len(flat)} images for {len(texts)} captions: image-caption pairs need one image per caption "
                f"(or put {self.image_marker!r} markers in the text for interleaved input)."
            )
        return [Pair(image, caption) for image, caption in zip(flat, texts)]

    def _documents_from_marked_text(self, texts, images, num_markers) -> list[Document]:
        per_text = _images_per_text(images, num_markers)
        documents = []
        for index, (text, text_images) in enumerate(zip(texts, per_text)):
            pieces = text.split(self.image_marker)
            segments = [pieces[0]]
            for image, piece in zip(text_images, pieces[1:]):
                segments += [image, piece]
            documents.append(Document(_check_segments([s for s in segments if not isinstance(s, str) or s], index)))
        return documents

    # ------------------------------------------------------------------------------------------
    # Samples -> token ids
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _collect_texts(samples) -> tuple[list[str], list[list[int]]]:
        """All texts of the batch in one list (one tokenizer call), and each sample's indices into it."""
        texts, slots = [], []
        for sample in samples:
            if isinstance(sample, Document):
                indices = []
                for segment in sample.segments:
                    if isinstance(segment, str):
                        indices.append(len(texts))
                        texts.append(segment)
                slots.append(indices)
            elif isinstance(sample, (Pair, Prompt)):
                slots.append([len(texts)])
                texts.append(sample.text)
            else:
                raise TypeError(f"Unknown sample type {type(sample).__name__}; expected Document, Pair or Prompt.")
        return texts, slots

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if hasattr(self.tokenizer, "encode_texts"):
            return self.tokenizer.encode_texts(texts)  # `LCLTokenizer`: the same ids, through its chunk cache
        # split_special_tokens: text that spells "<start_of_img>" must not forge an image block.
        encoded = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
        return encoded["input_ids"]

    @staticmethod
    def _image_first_draws(samples, image_first_prob: float, generator) -> list[bool]:
        """The layout of every sample: a pair's own `image_first` if set, else a draw (False for the others)."""
        num_draws = sum(isinstance(sample, Pair) and sample.image_first is None for sample in samples)
        if num_draws == 0 or image_first_prob <= 0.0:
            drawn = [False] * num_draws
        elif image_first_prob >= 1.0:
            drawn = [True] * num_draws
        else:
            drawn = (torch.rand(num_draws, generator=generator) < image_first_prob).tolist()
        draws, drawn = [], iter(drawn)
        for sample in samples:
            if not isinstance(sample, Pair):
                draws.append(False)
            else:
                draws.append(next(drawn) if sample.image_first is None else bool(sample.image_first))
        return draws

    def _image_block(self) -> list[int]:
        ids = self._token_ids
        return [ids["image_start"]] + [ids["image"]] * self.num_image_tokens + [ids["image_end"]]

    def _layout_document(self, document: Document, text_ids: list[list[int]]) -> LCLSequence:
        ids = self._token_ids
        input_ids, block_starts, images = [ids["bos"]], [], []
        texts = iter(text_ids)
        block = self._image_block()
        for segment in document.segments:
            if isinstance(segment, str):
                input_ids.extend(next(texts))
            else:
                block_starts.append(len(input_ids))
                input_ids.extend(block)
                images.append(segment)
            if len(input_ids) >= self.max_length:
                break  # everything after this point is cut anyway
        input_ids.append(ids["eos"])
        if len(input_ids) <= self.max_length:
            return LCLSequence(input_ids, images)
        cut, kept = self.max_length - 1, len(images)
        for index, start in enumerate(block_starts):
            if start + self.num_image_tokens + 1 >= cut:  # its <eoi> would not survive the cut
                cut, kept = min(cut, start), index
                break
        num_images = sum(not isinstance(segment, str) for segment in document.segments)
        return LCLSequence(input_ids[:cut] + [ids["eos"]], images[:kept], num_images - kept)

    def _layout_pair(self, pair: Pair, caption_ids: list[int], image_first: bool) -> LCLSequence:
        ids = self._token_ids
        caption_ids = caption_ids[: self.max_length - self.num_image_tokens - 4]
        if image_first:
            input_ids = self._image_block() + caption_ids + [ids["eos"]]
        else:
            input_ids = [ids["bos"]] + caption_ids + self._image_block()
        return LCLSequence(input_ids, [pair.image])

    def _layout_prompt(self, text_ids: list[int]) -> LCLSequence:
        ids = self._token_ids
        input_ids = [ids["bos"]] + text_ids[: self.max_length - 2] + [ids["eos"]]
        return LCLSequence(input_ids, is_prompt=True)

    # ------------------------------------------------------------------------------------------
    # Padding
    # ------------------------------------------------------------------------------------------

    def _pad(self, sequences: list[list[int]], padding, pad_to_multiple_of, return_tensors) -> tuple:
        longest = max(len(seq) for seq in sequences)
        if padding in (True, "longest"):
            length = longest
        elif padding == "max_length":
            length = self.max_length
        elif padding in (False, "do_not_pad"):
            if return_tensors and len({len(seq) for seq in sequences}) > 1:
                raise ValueError(
                    f"padding=False with return_tensors={return_tensors!r} needs sequences of one length."
                )
            return [list(seq) for seq in sequences], [[1] * len(seq) for seq in sequences]
        else:
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}.")
        if pad_to_multiple_of:
            rounded = -(-length // pad_to_multiple_of) * pad_to_multiple_of
            # Positions past max_length do not exist in the model.
            length = max(min(rounded, self.max_length), length)
        if not return_tensors:
            input_ids = [seq + [self.pad_token_id] * (length - len(seq)) for seq in sequences]
            attention_mask = [[1] * len(seq) + [0] * (length - len(seq)) for seq in sequences]
            return input_ids, attention_mask
        # Filled arrays: converting nested lists of thousands of ids with `torch.tensor` costs more than
        # tokenizing them.
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        is_token = np.arange(length) < lengths[:, None]
        input_ids = np.full((len(sequences), length), self.pad_token_id, dtype=np.int64)
        # Boolean assignment fills row by row: the ids of all sequences end to end.
        input_ids[is_token] = np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
        return input_ids, is_token.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _special_ids_of(tokenizer) -> dict[str, int]:
    names = {
        "bos": "bos_token",
        "eos": "eos_token",
        "image": "image_token",
        "image_start": "image_start_token",
        "image_end": "image_end_token",
    }
    ids, missing = {}, []
    for key, attribute in names.items():
        token = getattr(tokenizer, attribute, None)
        token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", object()):
            missing.append(attribute)
        ids[key] = token_id
    if missing:
        raise ValueError(
            f"The tokenizer lacks the LCL special tokens {missing}; build it with processing.build_clip_tokenizer() "
            "or processing.build_test_tokenizer()."
        )
    return ids


def check_image_first_prob(value: float) -> None:
    """The processor's and the readers' one check of an image-first probability."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"image_first_prob must be in [0, 1], got {value}.")


def _check_segments(segments, document_index: int) -> list:
    if not isinstance(segments, (list, tuple)):
        raise TypeError(f"Document {document_index} must be a list of segments, got {type(segments).__name__}.")
    for position, segment in enumerate(segments):
        if not isinstance(segment, str) and not is_valid_image(segment):
            raise TypeError(
                f"Document {document_index}, segment {position}: expected a str or an image (PIL image, numpy "
                f"array or torch tensor), got {type(segment).__name__}."
            )
    return list(segments)


def _flat_images(images) -> list:
    if is_valid_image(images):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be an image or a list of images, got {type(images).__name__}.")
    flat = []
    for item in images:
        if isinstance(item, (list, tuple)):
            flat.extend(_flat_images(item))
        elif is_valid_image(item):
            flat.append(item)
        else:
            raise TypeError(f"images must contain images (PIL, numpy, torch), got {type(item).__name__}.")
    return flat


def _images_per_text(images, num_markers: list[int]) -> list[list]:
    """Split `images` over texts with `num_markers[i]` markers; nested lists must match text by text."""
    total = sum(num_markers)
    if images is None:
        raise ValueError(f"The text holds {total} image markers but no images were given (0 images).")
    nested = isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)
    if nested:
        if len(images) != len(num_markers):
            raise ValueError(f"Got {len(images)} lists of images for {len(num_markers)} texts.")
        per_text = []
        for index, (text_images, count) in enumerate(zip(images, num_markers)):
            text_images = _flat_images(text_images)
            if len(text_images) != count:
                raise ValueError(
                    f"Text {index} holds {count} image markers but {len(text_images)} images were given for it."
                )
            per_text.append(text_images)
        return per_text
    flat = _flat_images(images)
    if len(flat) != total:
        raise ValueError(f"The text holds {total} image markers but {len(flat)} images were given.")
    per_text, start = [], 0
    for count in num_markers:
        per_text.append(flat[start : start + count])
        start += count
    return per_text


__all__ = ["LCLProcessor", "LCLSequence", "Document", "Pair", "Prompt", "IMAGE_MARKER"]
