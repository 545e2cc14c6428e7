"""Latent Compression Learning (LCL) as a native Transformers model.

Importing this package registers the model with the Auto classes: `AutoConfig` ("lcl"),
`AutoModel` and `AutoModelForZeroShotImageClassification` -> `LCLModel`, `AutoModelForPreTraining` ->
`LCLForPreTraining`, `AutoModelForImageTextToText` -> `LCLForConditionalGeneration` (captioning),
`AutoModelForImageClassification` -> `LCLForImageClassification`.

`LCLTrainer` and `LCLTrainingArguments` (`trainer_lcl.py`) are exported too, imported on first use so that
loading a model does not import transformers' `Trainer` stack.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
)

from .configuration_lcl import LCLConfig, LCLTextConfig
from .modeling_lcl import (
    LCLForPreTraining,
    LCLForPreTrainingOutput,
    LCLModel,
    LCLModelOutput,
    LCLPreTrainedModel,
    LCLTextModel,
    LCLVisionModel,
    LCLVisionModelOutput,
)
from .modeling_lcl_tasks import LCLForConditionalGeneration, LCLForImageClassification

AutoConfig.register(LCLConfig.model_type, LCLConfig, exist_ok=True)
AutoConfig.register(LCLTextConfig.model_type, LCLTextConfig, exist_ok=True)
AutoModel.register(LCLConfig, LCLModel, exist_ok=True)
AutoModelForPreTraining.register(LCLConfig, LCLForPreTraining, exist_ok=True)
AutoModelForZeroShotImageClassification.register(LCLConfig, LCLModel, exist_ok=True)
AutoModelForImageTextToText.register(LCLConfig, LCLForConditionalGeneration, exist_ok=True)
AutoModelForImageClassification.register(LCLConfig, LCLForImageClassification, exist_ok=True)

_LAZY_EXPORTS = {"LCLTrainer": ".trainer_lcl", "LCLTrainingArguments": ".trainer_lcl"}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LCLTrainer",
    "LCLTrainingArguments",
    "LCLConfig",
    "LCLTextConfig",
    "LCLPreTrainedModel",
    "LCLVisionModel",
    "LCLTextModel",
    "LCLModel",
    "LCLForPreTraining",
    "LCLForConditionalGeneration",
    "LCLForImageClassification",
    "LCLVisionModelOutput",
    "LCLModelOutput",
    "LCLForPreTrainingOutput",
]
