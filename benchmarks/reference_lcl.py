"""The reference LCL implementation (OpenGVLab/LCL, built on OpenCLIP), for side-by-side benchmarks.

Its code is never part of this repository: pass the `src/` folder of a checkout of the reference
repository (`--reference-src /path/to/LCL/src`). Its package is also called `open_clip`, like OpenCLIP
from PyPI, so it is imported under another name (`lcl_reference`) and both can live in one process.
It needs OpenCLIP's own dependencies (torchvision, timm, ftfy, regex).
"""

import importlib.util
import sys
from pathlib import Path

import torch

MODULE_NAME = "lcl_reference"


def import_reference(src: str | Path):
    """Import `<src>/open_clip` as the package `lcl_reference`."""
    package_dir = Path(src) / "open_clip"
    if not (package_dir / "lcl_model.py").is_file():
        raise FileNotFoundError(
            f"{package_dir} does not hold the reference LCL code (no lcl_model.py); pass the src/ folder of a "
            "checkout of the reference repository."
        )
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(
        MODULE_NAME, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def open_clip_config(config) -> dict:
    """The reference model's constructor arguments for the same sizes as our `LCLConfig`
    (for the reference variants, equal to its `model_configs/LCL_*.json`)."""
    vision, text = config.vision_config, config.text_config
    return {
        "embed_dim": config.projection_dim,
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.hidden_size,
            "layers": vision.num_hidden_layers,
            "head_width": vision.hidden_size // vision.num_attention_heads,
            "mlp_ratio": vision.intermediate_size / vision.hidden_size,
        },
        "text_cfg": {
            "context_length": text.max_position_embeddings,
            "vocab_size": text.vocab_size,
            "width": text.hidden_size,
            "heads": text.num_attention_heads,
            "layers": text.num_hidden_layers,
            "mlp_ratio": text.intermediate_size / text.hidden_size,
        },
        "pool_project_cfg": {
            "pool_proj_type": "attn",
            "input_dim": vision.hidden_size,
            "output_dim": config.projection_dim,
            "attn_num_heads": config.pooler_num_attention_heads,
        },
        "special_token_ids": {
            "<start_of_text>": config.bos_token_id,
            "<end_of_text>": config.eos_token_id,
            "<img_placehold>": config.image_token_id,
            "<start_of_img>": config.image_start_token_id,
            "<end_of_img>": config.image_end_token_id,
        },
    }


class ReferenceTrainStep:
    """The reference model + its loss (`LCLLoss`, local loss, weights 1.0 / 0.1), as its trainer runs them.

    The reference reads images and `(batch, context_length)` token ids padded with 0; its generation loss
    ignores every target equal to 0.
    """

    def __init__(self, src: str | Path, config):
        reference = import_reference(src)
        self.model = reference.lcl_model.LCL(**open_clip_config(config))
        self.loss = reference.loss.LCLLoss(
            generation_loss_weight=config.generation_loss_weight,
            contrastive_loss_weight=config.contrastive_loss_weight,
            local_loss=True,
            gather_with_grad=True,
        )

    def losses(self, pixel_values: torch.Tensor, padded_input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`loss`, `loss_contrastive`, `loss_generation` (each already weighted, as the reference logs them)."""
        outputs = self.model(pixel_values, padded_input_ids)
        contrastive, generation = self.loss(**outputs)
        return {"loss": contrastive + generation, "loss_contrastive": contrastive, "loss_generation": generation}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
