"""Latent Compression Learning (LCL) as a native Transformers model.

Importing this package registers the model with the Auto classes:
`AutoConfig` ("lcl"), `AutoModel` -> `LCLModel`, `AutoModelForPreTraining` -> `LCLForPreTraining`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

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

AutoConfig.register(LCLConfig.model_type, LCLConfig, exist_ok=True)
AutoConfig.register(LCLTextConfig.model_type, LCLTextConfig, exist_ok=True)
AutoModel.register(LCLConfig, LCLModel, exist_ok=True)
AutoModelForPreTraining.register(LCLConfig, LCLForPreTraining, exist_ok=True)

__all__ = [
    "LCLConfig",
    "LCLTextConfig",
    "LCLPreTrainedModel",
    "LCLVisionModel",
    "LCLTextModel",
    "LCLModel",
    "LCLForPreTraining",
    "LCLVisionModelOutput",
    "LCLModelOutput",
    "LCLForPreTrainingOutput",
]
