"""PyTorch LCL model: ViT + attentive pooling/projection + causal transformer.

Reads top-down: vision (ViT from transformers' CLIP, then `LCLAttentivePooler`), the causal head
(`LCLTextAttention` -> `LCLTextDecoderLayer` -> `LCLTextModel`), then `LCLModel` (both, interleaved)
and `LCLForPreTraining` (+ `lm_head` and the dual objective of `loss_lcl.py`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPMLP, eager_attention_forward
from transformers.utils import ModelOutput

from .configuration_lcl import LCLConfig, LCLTextConfig
from .loss_lcl import (
    FeatureGather,
    contrastive_loss_terms,
    contrastive_soi_mask,
    gather_local,
    generation_loss_sum,
    generation_target_mask,
    loss_prefix_lengths,
)
from .packing_lcl import plan_packing

# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class LCLVisionModelOutput(ModelOutput):
    r"""
    image_latents (`torch.FloatTensor` of shape `(num_images, projection_dim)`):
        Pooled latent `z` of each image (the learned query attending over the patch tokens), not normalised.
    image_token_embeds (`torch.FloatTensor` of shape `(num_images, num_image_tokens, projection_dim)`):
        One embedding per patch (the pooling block's value path); they replace the `<img>` placeholders.
    last_hidden_state (`torch.FloatTensor` of shape `(num_images, 1 + num_image_tokens, vision_hidden_size)`):
        ViT output after `ln_post`, class token first.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        ViT embeddings plus each block's output, each `(num_images, 1 + num_image_tokens, vision_hidden_size)`.
    """

    image_latents: torch.FloatTensor | None = None
    image_token_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LCLTextModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`):
        Raw output of the last causal block (no final LayerNorm: each head has its own).
    cache (`Cache`, *optional*):
        Key/value cache for decoding, when `use_cache=True`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Input embeddings plus each block's output, each `(batch_size, sequence_length, text_hidden_size)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LCLModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`):
        Raw causal-transformer outputs over the interleaved sequence.
    image_latents (`torch.FloatTensor` of shape `(num_images, projection_dim)`, *optional*):
        Pooled latent of every image in `pixel_values`, in document order, not normalised.
    soi_text_embeds (`torch.FloatTensor` of shape `(num_soi, projection_dim)`):
        `ln_final` + `text_projection` of the causal output at every `<soi>` (real tokens only), in
        document order, not normalised. Row i belongs to image i when the batch has images.
    soi_positions (`torch.LongTensor` of shape `(num_soi, 2)`):
        `(batch index, sequence index)` of each row of `soi_text_embeds`.
    cache (`Cache`, *optional*):
        Key/value cache, when `use_cache=True`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Causal-transformer hidden states, see `LCLTextModelOutput`.
    vision_outputs (`LCLVisionModelOutput`, *optional*):
        The vision tower's outputs, when images were given.
    logits_per_image (`torch.FloatTensor` of shape `(num_images, batch_size)`, *optional*):
        Retrieval mode only (images + plain prompts, see `LCLModel.forward`): scaled cosine similarity of
        each image with each prompt, as in CLIP.
    logits_per_text (`torch.FloatTensor` of shape `(batch_size, num_images)`, *optional*):
        Retrieval mode only: the transpose of `logits_per_image`.
    image_embeds (`torch.FloatTensor` of shape `(num_images, projection_dim)`, *optional*):
        Retrieval mode only: L2-normalised pooled latents.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
        Retrieval mode only: L2-normalised zero-shot text features (see `get_text_features`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    image_latents: torch.FloatTensor | None = None
    soi_text_embeds: torch.FloatTensor | None = None
    soi_positions: torch.LongTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_outputs: LCLVisionModelOutput | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


@dataclass
class LCLForPreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `generation_loss_weight * loss_generation + contrastive_loss_weight * loss_contrastive`.
    loss_contrastive (`torch.FloatTensor` of shape `()`, *optional*):
        Symmetric InfoNCE between the `<soi>` features and the pooled latents (unweighted).
    loss_generation (`torch.FloatTensor` of shape `()`, *optional*):
        Next-token cross-entropy on the supervised targets (unweighted); `None` when its weight is 0 (the
        LM head is then not run).
    logits (`torch.FloatTensor` of shape `(batch_size, logits_length, vocab_size)`, *optional*):
        Next-token logits of the last `logits_length` positions (all positions by default). Not computed
        when the loss is, unless `output_logits=True`: the loss only needs the supervised positions.
    image_embeds (`torch.FloatTensor` of shape `(num_pairs, projection_dim)`, *optional*):
        L2-normalised pooled latents of the images in contrastive pairs.
    text_embeds (`torch.FloatTensor` of shape `(num_pairs, projection_dim)`, *optional*):
        L2-normalised `<soi>` features paired row by row with `image_embeds`.
    logit_scale (`torch.FloatTensor` of shape `()`):
        Current learnable log inverse temperature.
    num_contrastive_pairs (`int`):
        Number of image/text pairs in the contrastive loss of this batch.
    num_generation_targets (`int`):
        Number of tokens in the generation loss of this batch.
    last_hidden_state, cache, hidden_states:
        As in `LCLModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    loss_contrastive: torch.FloatTensor | None = None
    loss_generation: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    num_contrastive_pairs: int | None = None
    num_generation_targets: int | None = None
    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class LCLPreTrainedModel(PreTrainedModel):
    config: LCLConfig
    config_class = LCLConfig
    base_model_prefix = "lcl"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "LCLTextDecoderLayer", "LCLAttentivePooler"]

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips parameter-less modules of custom code, assuming unguarded in-place init; ours goes
        # through `transformers.initialization`, which never overwrites loaded weights, so composite modules
        # (attention, MLP, heads) can own the initialisation of their projections.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module):
        """OpenCLIP's initialisation, module by module (the ViT, a stock CLIPVisionModel, initialises itself)."""
        factor = self.config.initializer_factor
        if isinstance(module, LCLTextAttention):
            width, layers = module.config.hidden_size, module.config.num_hidden_layers
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(proj.weight, std=width**-0.5 * (2 * layers) ** -0.5 * factor)
                init.zeros_(proj.bias)
            init.normal_(module.out_proj.weight, std=width**-0.5 * factor)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, CLIPMLP):
            width, layers = module.config.hidden_size, module.config.num_hidden_layers
            init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
            init.normal_(module.fc2.weight, std=width**-0.5 * (2 * layers) ** -0.5 * factor)
            init.zeros_(module.fc1.bias)
            init.zeros_(module.fc2.bias)
        elif isinstance(module, LCLTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=0.02 * factor)
            init.normal_(module.position_embedding.weight, std=0.01 * factor)
        elif isinstance(module, LCLAttentivePooler):
            init.normal_(module.probe, std=module.probe.shape[-1] ** -0.5 * factor)
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                init.normal_(proj.weight, std=proj.in_features**-0.5 * factor)
                if proj.bias is not None:
                    init.zeros_(proj.bias)
        elif isinstance(module, LCLLMHead):
            init.normal_(module.proj.weight, std=module.proj.in_features**-0.5 * factor)
        elif isinstance(module, LCLModel):
            init.normal_(module.text_projection.weight, std=module.text_projection.in_features**-0.5 * factor)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# Vision: ViT (transformers' CLIP) + attentive pooling/projection
# ----------------------------------------------------------------------------------------------


class LCLAttentivePooler(nn.Module):
    """One learned query cross-attends over the patch tokens (pooled latent `z`); the same block's
    value path, applied to every patch, gives the image-token embeddings.

    Unlike SigLIP's pooling head there is no MLP or residual: the reference block is
    `proj(MHA(LN_q(query), LN_k(patches), LN_v(patches)))`, with biases on q/k/v and none on `proj`.
    """

    def __init__(self, config: LCLConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        eps = config.vision_config.layer_norm_eps
        self.num_heads = config.pooler_num_attention_heads
        self.head_dim = config.projection_dim // self.num_heads
        self.probe = nn.Parameter(torch.randn(1, 1, vision_width))
        self.layer_norm_q = nn.LayerNorm(vision_width, eps=eps)
        self.layer_norm_k = nn.LayerNorm(vision_width, eps=eps)
        self.layer_norm_v = nn.LayerNorm(vision_width, eps=eps)
        self.q_proj = nn.Linear(vision_width, config.projection_dim)
        self.k_proj = nn.Linear(vision_width, config.projection_dim)
        self.v_proj = nn.Linear(vision_width, config.projection_dim)
        self.out_proj = nn.Linear(config.projection_dim, config.projection_dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patch_tokens `(num_images, N, vision_width)` -> pooled `(num_images, D)`, tokens `(num_images, N, D)`."""
        num_images = patch_tokens.shape[0]
        query = self.q_proj(self.layer_norm_q(self.probe)).expand(num_images, -1, -1)
        keys = self.k_proj(self.layer_norm_k(patch_tokens))
        values = self.v_proj(self.layer_norm_v(patch_tokens))  # (num_images, N, D)
        pooled = F.scaled_dot_product_attention(
            self._split_heads(query), self._split_heads(keys), self._split_heads(values)
        )  # (num_images, heads, 1, head_dim); SDPA's default scale is head_dim ** -0.5 as in the reference
        pooled = self.out_proj(pooled.transpose(1, 2).reshape(num_images, -1))
        image_token_embeds = self.out_proj(values)
        return pooled, image_token_embeds


class LCLVisionModel(LCLPreTrainedModel):
    """ViT + attentive pooling/projection.

    The ViT is a stock `CLIPVisionModel` (patch conv without bias, class token, learned positions,
    `pre_layrnorm`, pre-norm blocks, `post_layernorm`); as in the reference, `post_layernorm` is applied
    to every token, the class token is dropped and the patch tokens go to the pooler.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: LCLConfig):
        super().__init__(config)
        self.vit = CLIPVisionModel._from_config(config.vision_config)
        self.pooler = LCLAttentivePooler(config)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs
    ) -> LCLVisionModelOutput:
        _check_pixel_values(pixel_values, self.config)
        vit_outputs = self.vit(pixel_values=pixel_values, output_hidden_states=output_hidden_states, **kwargs)
        tokens = self.vit.post_layernorm(vit_outputs.last_hidden_state)
        image_latents, image_token_embeds = self.pooler(tokens[:, 1:])
        return LCLVisionModelOutput(
            image_latents=image_latents,
            image_token_embeds=image_token_embeds,
            last_hidden_state=tokens,
            hidden_states=vit_outputs.hidden_states,
        )


def _check_pixel_values(pixel_values: torch.Tensor, config: LCLConfig) -> None:
    size = config.vision_config.image_size
    expected = (size, size) if isinstance(size, int) else tuple(size)
    channels = config.vision_config.num_channels
    if pixel_values.ndim != 4 or pixel_values.shape[1] != channels or tuple(pixel_values.shape[2:]) != expected:
        raise ValueError(
            f"pixel_values must have shape (num_images, {channels}, {expected[0]}, {expected[1]}) for this "
            f"model, got {tuple(pixel_values.shape)}. Resize the images with the model's image processor."
        )


# ----------------------------------------------------------------------------------------------
# Causal head: CLIP-text-style causal transformer with a KV cache
# ----------------------------------------------------------------------------------------------


class LCLTextEmbeddings(nn.Module):
    def __init__(self, config: LCLTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class LCLTextAttention(nn.Module):
    """Causal multi-head self-attention (CLIP layout: separate q/k/v/out projections with bias)."""

    def __init__(self, config: LCLTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            attention_mask,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.config.attention_dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class LCLTextDecoderLayer(GradientCheckpointingLayer):
    """Pre-LN block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))` (CLIP's MLP, exact GELU)."""

    def __init__(self, config: LCLTextConfig, layer_idx: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = LCLTextAttention(config, layer_idx)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class LCLTextModel(LCLPreTrainedModel):
    """The causal transformer over interleaved embeddings. Returns raw block outputs (no final LayerNorm)."""

    config: LCLTextConfig
    config_class = LCLTextConfig
    input_modalities = ("text",)

    def __init__(self, config: LCLTextConfig):
        super().__init__(config)
        self.embeddings = LCLTextEmbeddings(config)
        self.layers = nn.ModuleList(LCLTextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding):
        self.embeddings.token_embedding = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> LCLTextModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.token_embedding(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        past_length = cache.get_seq_length() if cache is not None else 0
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=inputs_embeds.device)[None]
        max_positions = self.config.max_position_embeddings
        if past_length + seq_length > max_positions:
            raise ValueError(
                f"Sequence length {past_length + seq_length} exceeds the context length of this model "
                f"({max_positions} positions)."
            )
        hidden_states = inputs_embeds + self.embeddings.position_embedding(position_ids)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, causal_mask, cache=cache, position_ids=position_ids, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return LCLTextModelOutput(
            last_hidden_state=hidden_states, cache=cache if use_cache else None, hidden_states=all_hidden_states
        )


# ----------------------------------------------------------------------------------------------
# LCL: vision + causal head over interleaved sequences
# ----------------------------------------------------------------------------------------------


class LCLModel(LCLPreTrainedModel):
    """Vision encoder + causal transformer over interleaved text and image blocks.

    `input_ids` hold text tokens and image blocks `<soi> <img>×N <eoi>` in document order;
    `pixel_values` hold all images of the batch in that same order. The N image-token embeddings of
    image i replace the `<img>` placeholders of block i.
    """

    # A pre-training checkpoint also holds the LM head, which only LCLForPreTraining uses.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: LCLConfig):
        super().__init__(config)
        self.vision_model = LCLVisionModel._from_config(config)
        self.text_model = LCLTextModel._from_config(config.text_config)
        width = config.text_config.hidden_size
        self.text_final_layer_norm = nn.LayerNorm(width, eps=config.text_config.layer_norm_eps)
        # The reference stores a matrix P used as x @ P; a bias-free Linear holds P^T.
        self.text_projection = nn.Linear(width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.text_model.set_input_embeddings(value)

    def project_text(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Raw causal outputs `(..., text_hidden_size)` -> contrastive features `(..., projection_dim)`."""
        return self.text_projection(self.text_final_layer_norm(hidden_states))

    def get_image_features(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pooled latents `(num_images, projection_dim)` of `pixel_values` `(num_images, 3, H, W)`."""
        latents = self.vision_model(pixel_values).image_latents
        return F.normalize(latents, dim=-1) if normalize else latents

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """Zero-shot text features `(batch_size, projection_dim)`, the protocol of the reference.

        `input_ids` are tokenised as `<sot> prompt <eot>`; each sequence's `<eot>` is read as `<soi>`
        (the text then "announces" an image), and the causal output there is projected. Sequences
        already ending in `<soi>` are taken as they are. A sequence with neither is rejected.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        config = self.config
        input_ids = torch.where(input_ids == config.eos_token_id, config.image_start_token_id, input_ids)
        soi = (input_ids == config.image_start_token_id) & attention_mask.bool()
        missing = (~soi.any(-1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"get_text_features needs an <eot> (or <soi>) token in every sequence; sequences {missing} have "
                "none. Tokenise prompts as '<sot> prompt <eot>' and do not truncate the <eot> away."
            )
        # The first <soi> of each row; the text after it (if any) cannot influence it under causal attention.
        first_soi = soi.int().argmax(-1)
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = self.project_text(hidden[torch.arange(hidden.shape[0], device=hidden.device), first_soi])
        return F.normalize(features, dim=-1) if normalize else features

    def embed_interleaved(
        self, input_ids: torch.LongTensor, image_token_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with each image's N embeddings scattered into its `<img>` positions."""
        is_image_token = input_ids == self.config.image_token_id
        text_ids = input_ids.masked_fill(is_image_token, 0)
        embeds = self.text_model.get_input_embeddings()(text_ids)
        if image_token_embeds is None:
            return embeds
        image_token_embeds = image_token_embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(is_image_token.unsqueeze(-1), image_token_embeds)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        interleaved: bool | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        **kwargs,
    ) -> LCLModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Text tokens and image blocks `<soi> <img>×N <eoi>`, right-padded.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for real tokens, 0 for padding.
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`, *optional*):
            All images of the batch, in document order (sample 0's images first).

        interleaved (`bool`, *optional*):
            `True` reads `input_ids` as documents whatever they hold (the heads pass it, so images without
            image blocks are an error there); `False` asks for retrieval mode; `None` (default) picks
            retrieval mode when `pixel_values` are given and `input_ids` hold no image-block token at all.
        prefix_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Run the causal transformer only on the first `prefix_lengths[b]` tokens of each sequence, packed
            several to a row (see `packing_lcl`). Under causal attention these outputs are those of the full
            sequences; `last_hidden_state` is 0 after each prefix. `LCLForPreTraining(pack_sequences=True)` passes
            the prefixes its loss reads. Not with a cache, `position_ids` or `output_hidden_states`.

        Retrieval mode: the texts are candidate prompts (`<sot> prompt <eot>`), not documents, and the output
        carries CLIP-style `logits_per_image` / `logits_per_text`, which is what transformers'
        zero-shot-image-classification pipeline reads.
        """
        real_tokens = current_token_mask(input_ids, attention_mask)
        if interleaved is None:
            interleaved = pixel_values is None or cache is not None or self._has_image_block_tokens(input_ids)
        if not interleaved:
            if pixel_values is None:
                raise ValueError("Retrieval mode (interleaved=False) needs pixel_values.")
            return self._retrieval_forward(input_ids, real_tokens, pixel_values)
        if cache is None or cache.get_seq_length() == 0:
            # With a filled cache, only new text tokens arrive: there is nothing to check.
            validate_image_blocks(input_ids, real_tokens, pixel_values, self.config)

        vision_outputs = None
        if pixel_values is not None:
            vision_outputs = self.vision_model(pixel_values)
        inputs_embeds = self.embed_interleaved(
            input_ids, vision_outputs.image_token_embeds if vision_outputs is not None else None
        )
        if prefix_lengths is not None:
            if cache is not None or use_cache or position_ids is not None or output_hidden_states:
                raise ValueError(
                    "prefix_lengths (packed prefixes) cannot be combined with a cache, use_cache, position_ids or "
                    "output_hidden_states: the packed rows have their own positions and no per-sequence states."
                )
            plan = plan_packing(prefix_lengths.tolist(), input_ids.shape[1], device=input_ids.device)
            text_outputs = self.text_model(
                inputs_embeds=plan.pack(inputs_embeds), position_ids=plan.position_ids, **kwargs
            )  # no attention mask: transformers derives the per-segment causal mask from the position ids
            text_outputs.last_hidden_state = plan.unpack(text_outputs.last_hidden_state)
        else:
            text_outputs = self.text_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                **kwargs,
            )
        hidden = text_outputs.last_hidden_state
        soi_mask = (input_ids == self.config.image_start_token_id) & real_tokens.bool()
        soi_positions = soi_mask.nonzero()
        return LCLModelOutput(
            last_hidden_state=hidden,
            image_latents=vision_outputs.image_latents if vision_outputs is not None else None,
            soi_text_embeds=self.project_text(hidden[soi_mask]),
            soi_positions=soi_positions,
            cache=text_outputs.cache,
            hidden_states=text_outputs.hidden_states,
            vision_outputs=vision_outputs,
        )


    def _has_image_block_tokens(self, input_ids: torch.LongTensor) -> bool:
        config = self.config
        block_ids = torch.tensor(
            [config.image_token_id, config.image_start_token_id, config.image_end_token_id], device=input_ids.device
        )
        return bool(torch.isin(input_ids, block_ids).any())

    def _retrieval_forward(self, input_ids, attention_mask, pixel_values) -> LCLModelOutput:
        image_embeds = self.get_image_features(pixel_values, normalize=True)
        text_embeds = self.get_text_features(input_ids, attention_mask, normalize=True)
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.T
        return LCLModelOutput(
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )


def current_token_mask(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`(batch_size, sequence_length)` mask of the real tokens among `input_ids`.

    While decoding with a cache, `attention_mask` also covers the cached tokens: its last columns are the
    ones of the current `input_ids`.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids)
    return attention_mask[:, -input_ids.shape[1] :]


def validate_image_blocks(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None, config: LCLConfig
) -> None:
    """Raise a ValueError naming the problem unless every image block is whole and matches an image.

    Without `pixel_values`, `<soi>` may stand alone (the zero-shot text protocol) but no `<img>` may appear.
    With them, the real `<soi>` count must equal the image count and each `<soi>` must be followed by
    exactly N `<img>` and an `<eoi>`.
    """
    real = attention_mask.bool()
    num_placeholders = int(((input_ids == config.image_token_id) & real).sum())
    if pixel_values is None:
        if num_placeholders:
            raise ValueError(
                f"input_ids contain {num_placeholders} <img> placeholder tokens but no pixel_values were given."
            )
        return
    num_images = pixel_values.shape[0]
    n = config.num_image_tokens
    soi = (input_ids == config.image_start_token_id) & real
    num_blocks = int(soi.sum())
    if num_placeholders == 0:
        raise ValueError(
            f"pixel_values hold {num_images} images but input_ids contain no <img> placeholder tokens; use "
            "get_image_features for images alone, or the processor to insert image blocks."
        )
    if num_blocks != num_images:
        raise ValueError(
            f"Number of images ({num_images}) does not match the number of image blocks (<soi> tokens) in "
            f"input_ids ({num_blocks})."
        )
    # Every <soi> must open a whole block: N <img> tokens and then <eoi>, inside the real tokens.
    batch_index, start = soi.nonzero(as_tuple=True)
    offsets = torch.arange(1, n + 2, device=input_ids.device)
    block_positions = start[:, None] + offsets  # (num_blocks, N + 1)
    seq_len = input_ids.shape[1]
    inside = block_positions < seq_len
    clamped = block_positions.clamp(max=seq_len - 1)
    block_ids = input_ids[batch_index[:, None], clamped].masked_fill(~inside, -1)
    block_ids = block_ids.masked_fill(~real[batch_index[:, None], clamped], -1)
    expected = torch.full_like(block_ids, config.image_token_id)
    expected[:, -1] = config.image_end_token_id
    broken = (block_ids != expected).any(-1)
    if broken.any():
        i = int(broken.nonzero()[0])
        found = int((block_ids[i, :-1] == config.image_token_id).sum())
        raise ValueError(
            f"Image block at sample {int(batch_index[i])}, position {int(start[i])} is not whole: expected <soi> "
            f"+ {n} <img> + <eoi>, found {found} <img> tokens"
            f"{'' if block_ids[i, -1] == config.image_end_token_id else ' and no <eoi> after them'} "
            "(a block cut by truncation, or a wrong num_image_tokens)."
        )
    if num_placeholders != num_blocks * n:
        raise ValueError(
            f"input_ids contain {num_placeholders} <img> tokens, but {num_blocks} image blocks of {n} account for "
            f"{num_blocks * n}: some <img> tokens stand outside a <soi> ... <eoi> block."
        )


# ----------------------------------------------------------------------------------------------
# Pre-training: LM head + dual objective
# ----------------------------------------------------------------------------------------------


class LCLLMHead(nn.Module):
    """LayerNorm + Linear(width -> vocab, no bias) on the raw causal outputs (reference `lm_head.0/1`)."""

    def __init__(self, config: LCLTextConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(self.layer_norm(hidden_states))


class LCLForPreTraining(LCLPreTrainedModel):
    """`LCLModel` + `lm_head`, trained with `λ_gen·L_gen + λ_con·L_con`.

    The contrastive half takes a `contrastive_gather` (see `loss_lcl.GatheredFeatures`) so that a
    distributed trainer can supply features of all ranks; by default the batch is the whole world.
    """

    def __init__(self, config: LCLConfig):
        super().__init__(config)
        self.lcl = LCLModel(config)
        self.lm_head = LCLLMHead(config.text_config)
        self.contrastive_gather: FeatureGather = gather_local
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lcl.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.lcl.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.proj

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        return_loss: bool = True,
        output_logits: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        num_contrastive_pairs_in_batch: int | None = None,
        num_generation_targets_in_batch: int | None = None,
        contrastive_loss_weight: float | None = None,
        generation_loss_weight: float | None = None,
        pack_sequences: bool = False,
        **kwargs,
    ) -> LCLForPreTrainingOutput:
        r"""
        return_loss (`bool`, defaults to `True`):
            Compute the dual objective. Logits are then only computed on supervised positions, unless
            `output_logits=True`.
        output_logits (`bool`, *optional*):
            Return `(batch_size, logits_length, vocab_size)` logits; defaults to `not return_loss`.
        logits_to_keep (`int`, defaults to 0):
            Compute logits only for the last `logits_to_keep` positions (0: all), as in generation.
        num_contrastive_pairs_in_batch / num_generation_targets_in_batch (`int`, *optional*):
            Global denominators of the two means. A trainer sets them under gradient accumulation or on
            several processes so that every micro-batch's share adds up to the mean over the global batch.
        contrastive_loss_weight / generation_loss_weight (`float`, *optional*):
            Override the config's loss weights for this call (`LCLTrainer` passes its own). With a generation
            weight of 0 the LM head is not run and `loss_generation` is `None` (a contrastive-only run does
            not pay for the vocabulary-sized head).
        pack_sequences (`bool`, defaults to `False`):
            Run the causal transformer only on the prefix of each sequence that the loss reads, packed several
            to a row (`packing_lcl`): the same losses and gradients for less work, e.g. a text-first pair skips
            its whole image block. `last_hidden_state` is then 0 after each prefix. `LCLTrainer` turns it on
            (`LCLTrainingArguments.pack_sequences`). Needs `return_loss` and no logits, cache or hidden states.
        """
        real_tokens = current_token_mask(input_ids, attention_mask)
        weights = (
            self.config.contrastive_loss_weight if contrastive_loss_weight is None else contrastive_loss_weight,
            self.config.generation_loss_weight if generation_loss_weight is None else generation_loss_weight,
        )
        prefix_lengths = None
        if pack_sequences:
            if not return_loss or output_logits:
                raise ValueError(
                    "pack_sequences computes only the positions the loss reads: it needs return_loss=True and "
                    "output_logits=False."
                )
            config = self.config
            prefix_lengths = loss_prefix_lengths(
                input_ids, real_tokens, config.image_token_id, config.image_end_token_id, config.image_start_token_id,
                generation=weights[1] != 0, contrastive=pixel_values is not None,
            )  # fmt: skip
        outputs = self.lcl(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            interleaved=True,  # images + plain texts are an input error here, not a retrieval query
            prefix_lengths=prefix_lengths,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if output_logits is None:
            output_logits = not return_loss
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden) if output_logits else None

        result = LCLForPreTrainingOutput(
            logits=logits,
            logit_scale=self.lcl.logit_scale,
            last_hidden_state=hidden,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
        )
        if return_loss:
            self._add_losses(
                result, input_ids, real_tokens, outputs, num_contrastive_pairs_in_batch, num_generation_targets_in_batch,
                weights,
            )  # fmt: skip
        return result

    def _add_losses(self, result, input_ids, attention_mask, outputs, num_pairs_global, num_targets_global, weights):
        config = self.config
        hidden = outputs.last_hidden_state
        weight_contrastive, weight_generation = weights

        # Generation: only supervised positions go through the (vocab-sized) head, and none with weight 0.
        target_mask = generation_target_mask(
            input_ids, attention_mask, config.image_token_id, config.image_end_token_id
        )
        targets = input_ids[:, 1:][target_mask]
        num_targets = targets.numel()
        loss_generation = None
        if weight_generation != 0:
            loss_generation = generation_loss_sum(self.lm_head, hidden[:, :-1][target_mask], targets)
            loss_generation = loss_generation / max(num_targets_global or num_targets, 1)

        # Contrastive: <soi> features paired with the images in order, minus the <soi> at sequence start.
        image_embeds = text_embeds = None
        num_pairs = 0
        if outputs.image_latents is not None:
            all_soi = (input_ids == config.image_start_token_id) & attention_mask.bool()
            in_pairs = contrastive_soi_mask(input_ids, attention_mask, config.image_start_token_id)[all_soi]
            image_embeds = F.normalize(outputs.image_latents[in_pairs].float(), dim=-1)
            text_embeds = F.normalize(outputs.soi_text_embeds[in_pairs].float(), dim=-1)
        else:
            width = config.projection_dim
            image_embeds = text_embeds = hidden.new_zeros(0, width, dtype=torch.float32)
        loss_sum, num_pairs = contrastive_loss_terms(
            image_embeds, text_embeds, self.lcl.logit_scale, gather=self.contrastive_gather
        )
        denominator = num_pairs_global if num_pairs_global is not None else num_pairs
        # Zero pairs still returns a 0 attached to logit_scale, so every rank's graph has the same leaves.
        loss_contrastive = loss_sum / denominator if denominator else loss_sum + 0.0 * self.lcl.logit_scale

        result.loss_generation = loss_generation
        result.loss_contrastive = loss_contrastive
        result.loss = weight_contrastive * loss_contrastive
        if loss_generation is not None:
            result.loss = result.loss + weight_generation * loss_generation
        result.image_embeds = image_embeds
        result.text_embeds = text_embeds
        result.num_contrastive_pairs = num_pairs
        result.num_generation_targets = num_targets


__all__ = [
    "LCLPreTrainedModel",
    "LCLAttentivePooler",
    "LCLVisionModel",
    "LCLTextModel",
    "LCLModel",
    "LCLForPreTraining",
    "LCLVisionModelOutput",
    "LCLTextModelOutput",
    "LCLModelOutput",
    "LCLForPreTrainingOutput",
    "validate_image_blocks",
]
