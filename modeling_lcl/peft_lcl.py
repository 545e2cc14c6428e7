"""LoRA for LCL models with PEFT: default target modules and a config builder.

    from peft import get_peft_model
    from modeling_lcl.peft_lcl import lcl_lora_config

    peft_model = get_peft_model(model, lcl_lora_config(model))         # train with the stock Trainer
    peft_model.save_pretrained("adapter")                               # adapter only
    merged = PeftModel.from_pretrained(base, "adapter").merge_and_unload()

Targets are regular expressions on module names (PEFT full-matches a string `target_modules`), so they
work whatever wraps the towers: `vision_model.vit...` in `LCLForImageClassification`,
`lcl.vision_model.vit...` in `LCLForPreTraining` / `LCLForConditionalGeneration`, no prefix in `LCLModel`.
The attentive pooler and the lm_head are left out by default: the first is small and the second is
vocabulary-sized; pass `modules_to_save` to train them fully.
"""

from collections.abc import Sequence

from peft import LoraConfig
from torch import nn

from .modeling_lcl_tasks import LCLForImageClassification

_ATTENTION = r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"
_MLP = r"mlp\.(?:fc1|fc2)"
# The ViT blocks (transformers' CLIP encoder inside `LCLVisionModel.vit`) and the causal blocks.
TOWER_PATTERNS = {
    "vision": r"(?:.*\.)?vision_model\.vit\.encoder\.layers\.\d+\.",
    "text": r"(?:.*\.)?text_model\.layers\.\d+\.",
}


def lora_target_modules(towers: Sequence[str] = ("vision", "text"), include_mlp: bool = False) -> str:
    """A `target_modules` regex for the attention projections (and optionally the MLPs) of the given towers.

    `towers`: any of `"vision"` (the ViT) and `"text"` (the causal head).
    """
    unknown = set(towers) - set(TOWER_PATTERNS)
    if not towers or unknown:
        raise ValueError(f"towers must be a non-empty subset of {sorted(TOWER_PATTERNS)}, got {list(towers)}.")
    layers = f"(?:{_ATTENTION}|{_MLP})" if include_mlp else _ATTENTION
    prefixes = "|".join(TOWER_PATTERNS[tower] for tower in towers)
    return f"(?:{prefixes}){layers}"


def lcl_lora_config(
    model: nn.Module | None = None,
    towers: Sequence[str] | None = None,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    include_mlp: bool = False,
    modules_to_save: list[str] | None = None,
    **kwargs,
) -> LoraConfig:
    """A `LoraConfig` with LCL's default targets.

    Defaults follow the model: an `LCLForImageClassification` gets LoRA on the ViT and a fully trained
    (and saved) `classifier`; any other LCL model gets LoRA on both towers. `towers`, `modules_to_save`
    and any other `LoraConfig` argument (`kwargs`) override them.

    No `task_type` is set: PEFT then wraps the model in a plain `PeftModel`, which passes every argument
    (`pixel_values`, `cache`, ...) through to the LCL forward and keeps `generate()` of the wrapped model.
    """
    is_classifier = isinstance(model, LCLForImageClassification)
    if towers is None:
        towers = ("vision",) if is_classifier else ("vision", "text")
    if modules_to_save is None and is_classifier:
        modules_to_save = ["classifier"]
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(towers, include_mlp),
        modules_to_save=modules_to_save,
        **kwargs,
    )


__all__ = ["TOWER_PATTERNS", "lcl_lora_config", "lora_target_modules"]
