"""Turn documents, image-caption pairs and prompts into LCL model inputs, as LCL was trained.

Importing this package registers `LCLTokenizer`, `LCLImageProcessor` and `LCLProcessor` with
`AutoTokenizer`, `AutoImageProcessor` and `AutoProcessor` for the "lcl" model type.
"""

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from modeling_lcl import LCLConfig

from .build_tokenizer import build_clip_tokenizer, build_test_tokenizer, read_clip_merges
from .collator import LCLDataCollator
from .datasets_common import SkippingDataset, SkipStats, apply_builder
from .datasets_mmc4 import MMC4DocumentBuilder, load_mmc4
from .datasets_obelics import ObelicsDocumentBuilder, load_obelics
from .datasets_pairs import PairBuilder, load_image_folder_pairs, load_pairs, load_webdataset_pairs
from .image_processing_lcl import LCLImageProcessor, RandomResizedCrop
from .processing_lcl import IMAGE_MARKER, Document, LCLProcessor, LCLSequence, Pair, Prompt
from .tokenization_lcl import LCLTokenizer, clean_text

AutoTokenizer.register(LCLConfig, tokenizer_class=LCLTokenizer, exist_ok=True)
AutoImageProcessor.register(LCLConfig, image_processor_classes={"pil": LCLImageProcessor}, exist_ok=True)
AutoProcessor.register(LCLConfig, LCLProcessor, exist_ok=True)

__all__ = [
    "LCLTokenizer",
    "LCLImageProcessor",
    "LCLProcessor",
    "LCLDataCollator",
    "LCLSequence",
    "Document",
    "Pair",
    "Prompt",
    "IMAGE_MARKER",
    "RandomResizedCrop",
    "build_clip_tokenizer",
    "build_test_tokenizer",
    "read_clip_merges",
    "clean_text",
    "SkipStats",
    "SkippingDataset",
    "apply_builder",
    "MMC4DocumentBuilder",
    "ObelicsDocumentBuilder",
    "PairBuilder",
    "load_mmc4",
    "load_obelics",
    "load_pairs",
    "load_image_folder_pairs",
    "load_webdataset_pairs",
]
