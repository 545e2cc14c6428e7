"""Configuration of Latent Compression Learning (LCL) models.

An `LCLConfig` composes three parts, mirroring the reference OpenCLIP model:

- `vision_config`: a `CLIPVisionConfig` for the ViT (the reference ViT *is* a CLIP vision tower
  with exact GELU, so transformers' own blocks are reused unchanged);
- `text_config`: an `LCLTextConfig` for the causal transformer that reads interleaved sequences;
- the attentive pooling/projection settings (`projection_dim`, `pooler_num_attention_heads`),
  the loss weights and the special token ids.

The defaults reproduce the published ViT-B/16 LAION model (OpenGVLab/LCL-ViT-B-16-Laion).
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

CLASSIFIER_POOLING_CHOICES = ("latent", "mean")

# The reference ViT differs from CLIPVisionConfig's defaults (quick_gelu, patch 32) only here.
LCL_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


@strict
class LCLTextConfig(PreTrainedConfig):
    r"""
    Configuration of the causal transformer of an LCL model (CLIP-text style: learned positions,
    pre-LN blocks, exact GELU, causal self-attention).

    Args:
        vocab_size (`int`, defaults to 49411):
            CLIP BPE (49,408 tokens) plus `<img_placehold>`, `<start_of_img>`, `<end_of_img>`.
        hidden_size (`int`, defaults to 768):
            Width of the causal transformer.
        intermediate_size (`int`, defaults to 3072):
            Width of the MLP inside each block.
        num_hidden_layers (`int`, defaults to 12):
            Number of transformer blocks.
        num_attention_heads (`int`, defaults to 12):
            Number of attention heads; must divide `hidden_size`.
        max_position_embeddings (`int`, defaults to 280):
            Context length: size of the learned position table (280 for B/16 LAION, 128 for
            B/32 LAION, 2048 for B/32 MMC4).
        hidden_act (`str`, defaults to `"gelu"`):
            Activation of the MLP (the reference uses exact GELU).
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of every LayerNorm.
        attention_dropout (`float`, defaults to 0.0):
            Dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the token and position embeddings at initialisation.
        initializer_factor (`float`, defaults to 1.0):
            Multiplier on every initialisation standard deviation (1.0 reproduces CLIP's scheme).
        use_cache (`bool`, defaults to `True`):
            Whether the model returns a key/value cache when decoding.
    """

    model_type = "lcl_text_model"
    base_config_key = "text_config"

    vocab_size: int = 49411
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 280
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: int | float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Checked here rather than in `validate_architecture` so that users get a plain ValueError.
        _check_heads("text_config", self.hidden_size, self.num_attention_heads)


@strict
class LCLConfig(PreTrainedConfig):
    r"""
    Configuration of an LCL model: ViT + attentive pooling/projection + causal transformer.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The ViT. A dict is completed with the reference values (exact GELU, ViT-B/16 at 224px),
            not with `CLIPVisionConfig`'s own defaults.
        text_config (`dict` or `LCLTextConfig`, *optional*):
            The causal transformer.
        projection_dim (`int`, defaults to 768):
            Dimension of the pooled image latent, of the image-token embeddings and of the contrastive
            text features (`embed_dim` in the reference). The image-token embeddings replace text
            embeddings, so it must equal `text_config.hidden_size`.
        pooler_num_attention_heads (`int`, defaults to 12):
            Heads of the attentive pooling block; must divide `projection_dim`.
        logit_scale_init_value (`float`, defaults to ln(1/0.07)):
            Initial value of the learnable contrastive temperature (log scale).
        logit_scale_max (`float`, defaults to ln(100)):
            Upper bound the trainer clamps `logit_scale` to after each optimizer step.
        contrastive_loss_weight (`float`, defaults to 0.1):
            λ_con in `L = λ_gen·L_gen + λ_con·L_con`.
        generation_loss_weight (`float`, defaults to 1.0):
            λ_gen in `L = λ_gen·L_gen + λ_con·L_con`.
        image_token_id (`int`, defaults to 49408):
            `<img_placehold>`: the N placeholders replaced by image-token embeddings.
        image_start_token_id (`int`, defaults to 49409):
            `<start_of_img>` (`<soi>`): its causal output is the contrastive text feature.
        image_end_token_id (`int`, defaults to 49410):
            `<end_of_img>` (`<eoi>`).
        bos_token_id (`int`, defaults to 49406):
            `<start_of_text>` (`<sot>`).
        eos_token_id (`int`, defaults to 49407):
            `<end_of_text>` (`<eot>`).
        pad_token_id (`int`, defaults to 0):
            Padding id of the processor's batches (the reference pads with 0). Padding is read from
            `attention_mask`, never from this id, so the real token 0 (`!`) is still learned. The causal head
            (`text_config`, hence generation) pads with `<eot>` instead, as the tokenizer does: the rows a
            batched `generate()` fills must not read as `!`.
        initializer_factor (`float`, defaults to 1.0):
            Multiplier on every initialisation standard deviation.
        classifier_pooling (`str`, defaults to `"latent"`):
            Image representation of `LCLForImageClassification`: the pooled latent (`"latent"`) or the mean of
            the ViT's patch tokens (`"mean"`).
    """

    model_type = "lcl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=dict(LCL_VISION_DEFAULTS)),
        "text_config": LCLTextConfig,
    }

    vision_config: dict | CLIPVisionConfig | None = None
    text_config: dict | LCLTextConfig | None = None
    projection_dim: int = 768
    pooler_num_attention_heads: int = 12
    logit_scale_init_value: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    contrastive_loss_weight: float = 0.1
    generation_loss_weight: float = 1.0
    image_token_id: int = 49408
    image_start_token_id: int = 49409
    image_end_token_id: int = 49410
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407
    pad_token_id: int | None = 0
    initializer_factor: float = 1.0
    classifier_pooling: str = "latent"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.classifier_pooling not in CLASSIFIER_POOLING_CHOICES:
            raise ValueError(
                f"classifier_pooling must be one of {CLASSIFIER_POOLING_CHOICES}, got {self.classifier_pooling!r}."
            )
        if isinstance(self.vision_config, dict):
            self.vision_config = {**LCL_VISION_DEFAULTS, **self.vision_config}
            # Checked before CLIPVisionConfig sees it, which would wrap the error in its own exception type.
            _check_heads("vision_config", self.vision_config["hidden_size"], self.vision_config["num_attention_heads"])
        # The special ids are stated once, here; the causal head (and generation) read the same values, except
        # padding: <eot>, as the tokenizer pads (0, the batches' padding, is the real token "!").
        eos = self.eos_token_id[0] if isinstance(self.eos_token_id, list) else self.eos_token_id
        text_ids = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": eos}
        if self.text_config is None or isinstance(self.text_config, dict):
            self.text_config = {**(self.text_config or {}), **text_ids}
        else:
            for name, value in text_ids.items():
                setattr(self.text_config, name, value)
        super().__post_init__(**kwargs)
        self._check_consistency()

    @property
    def num_image_tokens(self) -> int:
        """N: the number of `<img>` placeholders per image, one per ViT patch."""
        return _patch_grid(self.vision_config.image_size, self.vision_config.patch_size)

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def _check_consistency(self):
        vision, text = self.vision_config, self.text_config
        _check_heads("vision_config", vision.hidden_size, vision.num_attention_heads)
        if self.projection_dim % self.pooler_num_attention_heads != 0:
            raise ValueError(
                f"projection_dim ({self.projection_dim}) is not divisible by "
                f"pooler_num_attention_heads ({self.pooler_num_attention_heads})."
            )
        if self.projection_dim != text.hidden_size:
            raise ValueError(
                f"projection_dim ({self.projection_dim}) must equal text_config.hidden_size "
                f"({text.hidden_size}): image-token embeddings replace text-token embeddings."
            )
        special_ids = {
            "image_token_id": self.image_token_id,
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        for name, token_id in special_ids.items():
            if not 0 <= token_id < text.vocab_size:
                raise ValueError(f"{name} ({token_id}) is outside the vocabulary (size {text.vocab_size}).")
        if len(set(special_ids.values())) != len(special_ids):
            raise ValueError(f"Special token ids must be distinct, got {special_ids}.")
        if self.num_image_tokens + 2 > text.max_position_embeddings:
            raise ValueError(
                f"An image block (<soi> + {self.num_image_tokens} <img> + <eoi>) does not fit in "
                f"text_config.max_position_embeddings ({text.max_position_embeddings})."
            )


def _check_heads(name: str, hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads != 0:
        raise ValueError(
            f"{name}.hidden_size ({hidden_size}) is not divisible by {name}.num_attention_heads ({num_heads})."
        )


def _patch_grid(image_size, patch_size) -> int:
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if height % patch_h or width % patch_w:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}.")
    return (height // patch_h) * (width // patch_w)


__all__ = ["LCLConfig", "LCLTextConfig"]
