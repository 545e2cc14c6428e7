"""The main job's embedded default data: scikit-learn's handwritten digits as LCL training data.

scikit-learn ships 1,797 real 8×8 grey-level digits (UCI "Optical Recognition of Handwritten Digits"). They
become RGB PIL images (the image processor upsamples them to the model's input size) and two kinds of
training examples, both in the format `processing.LCLDataCollator` reads:

- image-caption pairs `{"image", "text"}`: every training image with each caption template
  ("a handwritten seven", "the number 7", ...);
- interleaved documents `{"segments": [...]}`: a few digits, each with a sentence naming it, the image
  before or after its sentence (p = 0.5, as in LCL's MMC4 recipe).

A stratified, seeded split keeps `num_eval` digits (500 by default) out of training for evaluation.
Every example is a pure function of its index and the seed, so a resumed run sees the same data.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# "{name}" is the digit's word, "{digit}" its numeral.
CAPTION_TEMPLATES = (
    "a photo of the digit {name}",
    "a handwritten {name}",
    "the number {name}",
    "a handwritten {digit}",
    "an image of the digit {digit}",
    "a drawing of the number {name}",
    "the digit {name} written by hand",
    "a scanned {digit}",
)
SENTENCE_TEMPLATES = (
    "Here is a handwritten {name}.",
    "This one is a {name}.",
    "The next digit is {name}.",
    "Someone wrote the number {digit}.",
    "A {name} drawn by hand.",
    "Look at this {digit}.",
)
# Zero-shot prompts (the DESIGN.md protocol: "<sot> prompt <eot>", <eot> read as <soi>), ensembled per class.
ZERO_SHOT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")


def describe(template: str, label: int) -> str:
    return template.format(name=DIGIT_NAMES[label], digit=label)


@dataclass
class DigitSplit:
    """Images (RGB PIL, 8×8) and integer labels of the training and held-out digits."""

    train_images: list
    train_labels: np.ndarray
    eval_images: list
    eval_labels: np.ndarray


def load_digit_split(num_eval: int = 500, seed: int = 0) -> DigitSplit:
    """scikit-learn's digits, split into training and `num_eval` held-out images (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    if not 10 <= num_eval < len(digits.target):
        raise ValueError(f"num_eval must be in [10, {len(digits.target)}), got {num_eval}.")
    indices = np.arange(len(digits.target))
    train, held_out = train_test_split(indices, test_size=num_eval, random_state=seed, stratify=digits.target)
    # Intensities are 0..16; the image processor resizes the 8x8 grid to the model's input size.
    images = [Image.fromarray((image * (255 / 16)).astype(np.uint8)).convert("RGB") for image in digits.images]
    return DigitSplit(
        train_images=[images[i] for i in train],
        train_labels=digits.target[train],
        eval_images=[images[i] for i in held_out],
        eval_labels=digits.target[held_out],
    )


class DigitPairs(Dataset):
    """Every (training image, caption template) combination as an `{"image", "text", "image_first"}` pair.

    The layout of pair i (image first with probability `image_first_prob`) is drawn from a generator seeded
    with `(seed, i)`, so it belongs to the example rather than to the collator's random state: a run resumed
    from a checkpoint sees the same layouts as an uninterrupted one.
    """

    def __init__(
        self, images: list, labels: np.ndarray, templates=CAPTION_TEMPLATES, image_first_prob: float = 0.5, seed: int = 0
    ):
        self.images, self.labels, self.templates = images, labels, templates
        self.image_first_prob = image_first_prob
        self.seed = seed

    def __len__(self):
        return len(self.images) * len(self.templates)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        image_index, template_index = divmod(index, len(self.templates))
        label = int(self.labels[image_index])
        image_first = bool(np.random.default_rng((self.seed, index)).random() < self.image_first_prob)
        return {
            "image": self.images[image_index],
            "text": describe(self.templates[template_index], label),
            "image_first": image_first,
        }


class DigitDocuments(Dataset):
    """Interleaved documents of `digits_per_document` random training digits, each with a sentence naming it.

    Document i is drawn from a generator seeded with `(seed, i)`: the same index always gives the same
    document. The default of 2 digits keeps a document inside the tiny demo model's 64-token context.
    """

    def __init__(
        self,
        images: list,
        labels: np.ndarray,
        num_documents: int,
        digits_per_document: int = 2,
        image_first_prob: float = 0.5,
        seed: int = 0,
        templates=SENTENCE_TEMPLATES,
    ):
        self.images, self.labels, self.templates = images, labels, templates
        self.num_documents = num_documents
        self.digits_per_document = digits_per_document
        self.image_first_prob = image_first_prob
        self.seed = seed

    def __len__(self):
        return self.num_documents

    def __getitem__(self, index):
        if not 0 <= index < self.num_documents:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        segments = []
        for image_index in rng.choice(len(self.images), size=self.digits_per_document, replace=False):
            sentence = describe(self.templates[rng.integers(len(self.templates))], int(self.labels[image_index]))
            image = self.images[image_index]
            segments += [image, sentence] if rng.random() < self.image_first_prob else [sentence, image]
        return {"segments": segments}


def digit_training_data(
    split: DigitSplit, kind: str = "paired", seed: int = 0, image_first_prob: float = 0.5
) -> Dataset:
    """Training examples: `"paired"` captions, `"interleaved"` documents, or `"both"` (concatenated)."""
    pairs = DigitPairs(split.train_images, split.train_labels, image_first_prob=image_first_prob, seed=seed)
    documents = DigitDocuments(
        split.train_images, split.train_labels, num_documents=len(pairs), image_first_prob=image_first_prob, seed=seed
    )
    if kind == "paired":
        return pairs
    if kind == "interleaved":
        return documents
    if kind == "both":
        return ConcatDataset([pairs, documents])
    raise ValueError(f"kind must be 'paired', 'interleaved' or 'both', got {kind!r}.")


def held_out_captions(labels: np.ndarray, templates=CAPTION_TEMPLATES) -> list[str]:
    """One caption per held-out image (templates in turn), for image->text retrieval."""
    return [describe(templates[i % len(templates)], int(label)) for i, label in enumerate(labels)]


__all__ = [
    "CAPTION_TEMPLATES",
    "DIGIT_NAMES",
    "SENTENCE_TEMPLATES",
    "ZERO_SHOT_TEMPLATES",
    "DigitDocuments",
    "DigitPairs",
    "DigitSplit",
    "describe",
    "digit_training_data",
    "held_out_captions",
    "load_digit_split",
]
