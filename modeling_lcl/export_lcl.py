"""Export the ViT of an LCL model as a plain `CLIPVisionModel` folder.

LCL pre-trains a vision encoder; downstream, that encoder is what people plug into LLaVA-style pipelines,
which load a `CLIPVisionModel` and a `CLIPImageProcessor`. Our ViT *is* a `CLIPVisionModel`
(`LCLModel.vision_model.vit`), so the export is a copy of its weights plus an image processor; the
attentive pooling block and the causal transformer are left out.

The weights are written under the long-standing `vision_model.` key prefix (transformers 4.x layout, and
that of every CLIP checkpoint on the Hub), which transformers 5 also loads: the folder then works in the
pipelines of both generations.

What exported users get: `last_hidden_state` is the ViT output *before* `post_layernorm` (CLIP's
convention), `pooler_output` is `post_layernorm` of the class token. LCL itself uses
`post_layernorm(last_hidden_state)[:, 1:]` (all patch tokens after `ln_post`) as the input of its pooling
block; LLaVA-style pipelines usually take `hidden_states[-2][:, 1:]` instead. Both are available unchanged.

The image processor is a plain `CLIPImageProcessor` with the LCL settings (shortest side, bicubic, center
crop, CLIP mean/std). One detail differs from `LCLImageProcessor`: CLIP's center crop floors the offset
where the reference (torchvision) rounds it, so some image sizes are cropped one pixel apart.
"""

import copy
import os
from pathlib import Path

from transformers import CLIPImageProcessorPil, CLIPVisionModel
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils import logging

from .convert_lcl import SAFE_WEIGHTS_NAME, atomic_output_dir, save_safetensors
from .modeling_lcl import LCLForPreTraining, LCLModel, LCLVisionModel

logger = logging.get_logger(__name__)

# Settings of CLIPImageProcessor that an LCL image processor may carry over.
_CLIP_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)


def reference_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """The reference evaluation transform: shortest side to `image_size` (bicubic), center crop, CLIP mean/std."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def _clip_image_processor(image_processor: BaseImageProcessor | None, image_size: int) -> CLIPImageProcessorPil:
    if image_processor is None:
        return reference_image_processor(image_size)
    if not isinstance(image_processor, BaseImageProcessor):
        raise TypeError(f"image_processor must be an image processor, got {type(image_processor).__name__}.")
    settings = image_processor.to_dict()
    return CLIPImageProcessorPil(**{key: settings[key] for key in _CLIP_PROCESSOR_KEYS if key in settings})


def _vision_tower(model: LCLModel | LCLForPreTraining | LCLVisionModel | str | os.PathLike) -> CLIPVisionModel:
    if isinstance(model, (str, os.PathLike)):
        # Load the class the folder was saved as, so no weights are reported as unexpected.
        architectures = LCLModel.config_class.from_pretrained(model).architectures or []
        model_class = LCLForPreTraining if "LCLForPreTraining" in architectures else LCLModel
        model = model_class.from_pretrained(model)
    if isinstance(model, LCLForPreTraining):
        model = model.lcl
    if isinstance(model, LCLModel):
        model = model.vision_model
    if not isinstance(model, LCLVisionModel):
        raise TypeError(
            "Expected an LCL model (LCLModel, LCLForPreTraining, LCLVisionModel) or a folder, "
            f"got {type(model).__name__}."
        )
    return model.vit


def export_vision_tower(
    model: LCLModel | LCLForPreTraining | LCLVisionModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    image_processor: BaseImageProcessor | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the ViT of `model` (without the pooling block) as a `CLIPVisionModel` folder with a
    `CLIPImageProcessor`, loadable with `CLIPVisionModel.from_pretrained(output_dir)`.

    Args:
        model: an LCL model, or a folder holding one.
        output_dir: where to write; created atomically (nothing is left behind on failure).
        image_processor: settings to carry over (e.g. the model's `LCLImageProcessor`); defaults to the
            reference evaluation transform at the model's image size.
        overwrite: replace a non-empty `output_dir`.
    """
    vit = _vision_tower(model)
    processor = _clip_image_processor(image_processor, vit.config.image_size)
    config = copy.deepcopy(vit.config)
    config.architectures = ["CLIPVisionModel"]
    weights = {f"vision_model.{name}": tensor for name, tensor in vit.state_dict().items()}
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        config.save_pretrained(staging)
        save_safetensors(weights, staging / SAFE_WEIGHTS_NAME)
        processor.save_pretrained(staging)
    logger.info(f"Exported the LCL vision tower to {output_dir} as a CLIPVisionModel.")
    return Path(output_dir)


__all__ = ["export_vision_tower", "reference_image_processor"]
