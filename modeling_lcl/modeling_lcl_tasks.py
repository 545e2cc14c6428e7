"""Task heads on a pre-trained LCL model: captioning (`LCLForConditionalGeneration`) and image
classification (`LCLForImageClassification`).

Both load an `LCLForPreTraining` checkpoint unchanged:

- `LCLForConditionalGeneration` has the same submodules (`lcl`, `lm_head`), so every weight maps
  one to one; it adds `GenerationMixin` (KV cache, greedy / beam search / sampling).
- `LCLForImageClassification` keeps only the vision tower. Its `vision_model` is the checkpoint's
  `lcl.vision_model`: transformers strips the `base_model_prefix` ("lcl.") when a head model without
  that attribute loads a checkpoint that has it, and the causal head's weights are ignored.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast, ImageClassifierOutput

from .configuration_lcl import LCLConfig
from .modeling_lcl import (
    LCLLMHead,
    LCLModel,
    LCLPreTrainedModel,
    LCLVisionModel,
)

# ----------------------------------------------------------------------------------------------
# Captioning / multimodal generation
# ----------------------------------------------------------------------------------------------


class LCLForConditionalGeneration(LCLPreTrainedModel, GenerationMixin):
    """`LCLModel` + `lm_head` for next-token generation conditioned on images.

    A caption prompt is the image-first layout of the pre-training pairs: `<soi> <img>×N <eoi>`,
    optionally followed by a text prefix, with all images of the batch in `pixel_values` (document
    order). `generate()` then continues the text until `<eot>` (`config.eos_token_id`).

    Images are encoded once: transformers' `prepare_inputs_for_generation` forwards `pixel_values`
    only on the prefill step when a cache is used (after that the image tokens live in the cache),
    and on every step with `use_cache=False`, where the whole sequence is re-read.

    The default generation config suppresses the image-block tokens (`<soi>`, `<img>`, `<eoi>`): the
    model cannot produce pixels, so an emitted block could never be filled. It pads rows that finished early
    with `<eot>`, not with the config's `pad_token_id` (0, a real token in CLIP BPE).
    """

    def __init__(self, config: LCLConfig):
        super().__init__(config)
        self.lcl = LCLModel(config)
        self.lm_head = LCLLMHead(config.text_config)
        self.post_init()
        self._set_generation_defaults()

    def _set_generation_defaults(self):
        config, generation_config = self.config, self.generation_config
        if generation_config.suppress_tokens is None:
            generation_config.suppress_tokens = [
                config.image_start_token_id,
                config.image_token_id,
                config.image_end_token_id,
            ]
        # Rows of a batch that finish early are filled with `pad_token_id`. The config's (0, the reference's
        # padding id) is the real token "!", which decoding would keep; <eot> is dropped with the special tokens.
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        if eos is not None and generation_config.pad_token_id in (None, config.pad_token_id):
            generation_config.pad_token_id = eos

    def adjust_generation_fn(self, *args, **kwargs):
        # `from_pretrained` replaces the generation config with the checkpoint's (or one built from its
        # config.json, e.g. for a pre-training checkpoint): keep the defaults the checkpoint does not set.
        super().adjust_generation_fn(*args, **kwargs)
        self._set_generation_defaults()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lcl.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.lcl.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.proj

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head.proj = value

    def get_image_features(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pooled latents `(num_images, projection_dim)`, see `LCLModel.get_image_features`."""
        return self.lcl.get_image_features(pixel_values, normalize=normalize)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Text tokens and image blocks `<soi> <img>×N <eoi>`; on decoding steps with a filled `cache`,
            only the new tokens.
        attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
            1 for real tokens, 0 for padding (left padding for batched generation).
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`, *optional*):
            All images of the batch in document order; needed whenever `input_ids` hold image blocks.
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions in the learned position table; `generate()` derives them from `attention_mask`
            so that left padding does not shift them.
        logits_to_keep (`int`, defaults to 0):
            Compute logits only for the last `logits_to_keep` positions (0: all); `generate()` sets 1.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets aligned with `input_ids` (the shift happens inside the loss); -100 marks
            positions without a target (prompt, `<img>`, `<eoi>`, padding). Logits are then computed on
            every position.

        Returns:
            `CausalLMOutputWithPast` with `logits` of shape `(batch_size, logits_length, vocab_size)`, `cache`,
            and `loss` (mean next-token cross-entropy) when `labels` are given.
        """
        outputs = self.lcl(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            interleaved=True,  # images + plain texts are an input error here, not a retrieval query
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep and labels is None:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Beam search and `num_return_sequences` repeat each sample `expand_size` times.

        The default repeats every tensor row by row, which is right for `input_ids` but not for
        `pixel_values` once a sample holds several images: sample i's *group* of images must be repeated.
        """
        pixel_values = model_kwargs.pop("pixel_values", None)
        if expand_size > 1 and pixel_values is not None:
            pixel_values = _repeat_images_per_sample(
                pixel_values, input_ids, model_kwargs.get("attention_mask"), self.config, expand_size
            )
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


def _repeat_images_per_sample(
    pixel_values: torch.Tensor,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    config: LCLConfig,
    expand_size: int,
) -> torch.Tensor:
    """`(num_images, C, H, W)` -> `(num_images * expand_size, C, H, W)`, each sample's images repeated as a group."""
    is_soi = input_ids == config.image_start_token_id
    if attention_mask is not None:
        is_soi &= attention_mask.bool()
    images_per_sample = is_soi.sum(-1).tolist()
    if sum(images_per_sample) != pixel_values.shape[0]:
        raise ValueError(
            f"pixel_values hold {pixel_values.shape[0]} images but input_ids contain {sum(images_per_sample)} "
            "image blocks (<soi> tokens)."
        )
    groups = pixel_values.split(images_per_sample)
    return torch.cat([group.repeat(expand_size, 1, 1, 1) for group in groups])


# ----------------------------------------------------------------------------------------------
# Image classification
# ----------------------------------------------------------------------------------------------

class LCLForImageClassification(LCLPreTrainedModel):
    """The LCL vision tower + a linear classifier.

    The image representation is chosen by `config.classifier_pooling`:

    - `"latent"`: the pooled latent `z` of the attentive pooler, `(batch_size, projection_dim)`: the
      representation LCL pre-trains for retrieval and zero-shot use;
    - `"mean"`: the mean of the ViT's patch tokens after `ln_post`, `(batch_size, vision_hidden_size)`,
      the usual choice for fine-tuning and linear probing of ViTs.

    The loss follows `config.problem_type` like every transformers classifier: cross-entropy for
    integer `labels`, MSE for one label, BCE for multi-label float targets.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # A pre-training checkpoint also holds the causal head; it is not needed here.
    _keys_to_ignore_on_load_unexpected = [
        r"^(lcl\.)?text_model\.",
        r"^(lcl\.)?text_final_layer_norm\.",
        r"^(lcl\.)?text_projection\.",
        r"^(lcl\.)?logit_scale$",
        r"^lm_head\.",
    ]

    def __init__(self, config: LCLConfig):
        super().__init__(config)
        self.pooling = config.classifier_pooling
        self.num_labels = config.num_labels
        self.vision_model = LCLVisionModel._from_config(config)
        width = config.projection_dim if self.pooling == "latent" else config.vision_config.hidden_size
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self.classifier and isinstance(module, nn.Linear):
            # A small head keeps the first fine-tuning steps from wrecking the pre-trained features.
            init.normal_(module.weight, std=0.02 * self.config.initializer_factor)
            init.zeros_(module.bias)

    def get_image_representation(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None):
        """`(batch_size, width)` features the classifier reads, and the vision outputs they came from."""
        vision_outputs = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        if self.pooling == "latent":
            features = vision_outputs.image_latents
        else:
            features = vision_outputs.last_hidden_state[:, 1:].mean(dim=1)  # patch tokens, class token dropped
        return features, vision_outputs

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            One image per sample.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels)` (or float targets, see `config.problem_type`).

        Returns:
            `ImageClassifierOutput` with `logits` of shape `(batch_size, num_labels)` and `loss` when
            `labels` are given; `hidden_states` are the ViT's.
        """
        features, vision_outputs = self.get_image_representation(pixel_values, output_hidden_states)
        logits = self.classifier(features)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=vision_outputs.hidden_states)


__all__ = ["LCLForConditionalGeneration", "LCLForImageClassification"]
