"""Verification of a converted checkpoint: the reference model's forward, written on the source tensors.

`verify_conversion(source_state_dict, model)` runs `_Reference` (the reference's inference math on the
OpenCLIP-layout tensors: its attention op on `in_proj_weight`, `x @ P`, the pooling block's separate q/k/v
biases) and the converted `LCLForPreTraining` on the same deterministic inputs (`make_verification_inputs`)
and returns the max abs differences of image latents, `<soi>` features, text features, logits and both
losses; `check_verification` raises above `VERIFY_TOLERANCE`. Nothing here reads the converted model's key
names, so a mapping error in `convert_lcl` cannot hide itself.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .configuration_lcl import LCLConfig
from .modeling_lcl import LCLForPreTraining

VERIFY_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------
# Reference-equivalent forward on the source tensors (for verification)
# ----------------------------------------------------------------------------------------------


_ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


class _Reference:
    """The reference model's inference math, run directly on the reference-layout tensors.

    Residual blocks use `F.multi_head_attention_forward` on `in_proj_weight`, the op that the reference's
    `nn.MultiheadAttention` runs; the pooling block uses its separate q/k/v biases; the text projection is
    `x @ P`. Nothing here touches the converted model or its key names.
    """

    def __init__(self, source: dict[str, torch.Tensor], config: LCLConfig):
        self.sd = {key: value.float() for key, value in source.items()}
        self.config = config
        self.vision_eps = config.vision_config.layer_norm_eps
        self.text_eps = config.text_config.layer_norm_eps

    def _ln(self, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.sd[f"{prefix}.weight"], self.sd[f"{prefix}.bias"], eps=eps)

    def _linear(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sd[f"{prefix}.weight"], self.sd[f"{prefix}.bias"])

    def _blocks(self, prefix: str, x: torch.Tensor, tower, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x `(batch, seq, width)` through OpenCLIP residual blocks, run like the reference as `(seq, batch, width)`."""
        x = x.transpose(0, 1)
        width, eps = x.shape[-1], tower.layer_norm_eps
        if tower.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"The reference model has no '{tower.hidden_act}' activation (only {list(_ACTIVATIONS)}).")
        act = _ACTIVATIONS[tower.hidden_act]
        for i in range(tower.num_hidden_layers):
            p = f"{prefix}.{i}"
            h = self._ln(f"{p}.ln_1", x, eps)
            attn, _ = F.multi_head_attention_forward(
                h, h, h, width, tower.num_attention_heads,
                self.sd[f"{p}.attn.in_proj_weight"], self.sd[f"{p}.attn.in_proj_bias"],
                None, None, False, 0.0,
                self.sd[f"{p}.attn.out_proj.weight"], self.sd[f"{p}.attn.out_proj.bias"],
                training=False, need_weights=False, attn_mask=mask,
            )
            x = x + attn
            h = self._ln(f"{p}.ln_2", x, eps)
            x = x + self._linear(f"{p}.mlp.c_proj", act(self._linear(f"{p}.mlp.c_fc", h)))
        return x.transpose(0, 1)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values `(n, 3, H, W)` -> pooled latents `(n, D)`, image-token embeddings `(n, N, D)`."""
        vision, eps = self.config.vision_config, self.vision_eps
        x = F.conv2d(pixel_values, self.sd["visual.conv1.weight"], stride=vision.patch_size)
        x = x.flatten(2).transpose(1, 2)  # (n, N, width)
        cls = self.sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.sd["visual.positional_embedding"]
        x = self._blocks("visual.transformer.resblocks", self._ln("visual.ln_pre", x, eps), vision)
        patches = self._ln("visual.ln_post", x, eps)[:, 1:]  # class token dropped

        pool = "pool_project.pooler"
        query = self._ln(f"{pool}.norm1_q", self.sd["pool_project.query_token"], eps)
        keys = self._ln(f"{pool}.norm1_k", patches, eps)
        values = self._ln(f"{pool}.norm1_v", patches, eps)
        q = F.linear(query, self.sd[f"{pool}.cross_attn.q.weight"], self.sd[f"{pool}.cross_attn.q_bias"])
        k = F.linear(keys, self.sd[f"{pool}.cross_attn.k.weight"], self.sd[f"{pool}.cross_attn.k_bias"])
        v = F.linear(values, self.sd[f"{pool}.cross_attn.v.weight"], self.sd[f"{pool}.cross_attn.v_bias"])
        proj = self.sd[f"{pool}.cross_attn.proj.weight"]
        n, num_patches, dim = v.shape
        heads = self.config.pooler_num_attention_heads
        head_dim = dim // heads
        q = q.reshape(1, 1, heads, head_dim).transpose(1, 2)  # (1, heads, 1, head_dim), shared by all images
        k = k.reshape(n, num_patches, heads, head_dim).transpose(1, 2)
        vh = v.reshape(n, num_patches, heads, head_dim).transpose(1, 2)
        weights = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1)  # (n, heads, 1, N)
        pooled = (weights @ vh).transpose(1, 2).reshape(n, dim) @ proj.T
        return pooled, v @ proj.T

    def text_outputs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Causal-transformer outputs `(batch, seq, width)`; `<img>` positions take `image_tokens` in order."""
        embeds = self.sd["text.token_embedding.weight"][input_ids]
        if image_tokens is not None:
            embeds[input_ids == self.config.image_token_id] = image_tokens.reshape(-1, embeds.shape[-1])
        seq = input_ids.shape[1]
        x = embeds + self.sd["text.positional_embedding"][:seq]
        causal = torch.full((seq, seq), float("-inf")).triu(1)
        return self._blocks("text.transformer.resblocks", x, self.config.text_config, causal)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._ln("text.ln_final", hidden, self.text_eps) @ self.sd["text.text_projection"]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._ln("lm_head.0", hidden, self.text_eps) @ self.sd["lm_head.1.weight"].T

    def losses(self, input_ids: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference objective: targets equal to 0 (its padding id) dropped, a `<soi>` at position 0 skipped."""
        config = self.config
        targets = input_ids[:, 1:]
        gen_mask = (targets != config.image_token_id) & (targets != config.image_end_token_id) & (targets != 0)
        loss_generation = F.cross_entropy(self.lm_logits(hidden[:, :-1][gen_mask]), targets[gen_mask])

        is_soi = input_ids == config.image_start_token_id
        in_pairs = is_soi & (torch.arange(input_ids.shape[1]) > 0)
        text_features = F.normalize(self.project(hidden[in_pairs]), dim=-1)
        image_features = F.normalize(pooled[in_pairs[is_soi]], dim=-1)  # images in <soi> order
        logits = self.sd["logit_scale"].exp() * image_features @ text_features.T
        labels = torch.arange(logits.shape[0])
        loss_contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {
            "image_embeds": image_features,
            "text_embeds": text_features,
            "loss_contrastive": loss_contrastive,
            "loss_generation": loss_generation,
            "loss": config.generation_loss_weight * loss_generation + config.contrastive_loss_weight * loss_contrastive,
        }


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


class VerificationInputs(NamedTuple):
    input_ids: torch.Tensor  # (3, seq) documents, right-padded with 0
    attention_mask: torch.Tensor  # (3, seq)
    pixel_values: torch.Tensor  # (3, 3, H, W), one image per document
    prompt_ids: torch.Tensor  # (3, prompt_len) "<sot> prompt <eot>", right-padded with 0
    prompt_mask: torch.Tensor


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return ids, mask


def make_verification_inputs(config: LCLConfig, seed: int = 0) -> VerificationInputs:
    """Random documents covering both pair orders, padding and zero-shot prompts.

    Two documents put the text first (`<sot> text <soi> <img>×N <eoi> text <eot>`: contrastive pairs) and
    one puts the image first (captioning only); their lengths differ, so there is padding. Text tokens
    avoid id 0 and the special ids: the reference drops targets equal to 0 (its padding id), ours reads
    padding from `attention_mask`, and the two agree exactly when no real token is 0.
    """
    generator = torch.Generator().manual_seed(seed)
    text = config.text_config
    num_image_tokens = config.num_image_tokens
    room = text.max_position_embeddings - (num_image_tokens + 2) - 2  # text tokens beside one image block
    if room < 2:
        raise ValueError(
            f"Verification needs room for 2 text tokens beside an image block; context {text.max_position_embeddings} "
            f"and {num_image_tokens} image tokens leave {room}."
        )
    special = {config.image_token_id, config.image_start_token_id, config.image_end_token_id,
               config.bos_token_id, config.eos_token_id, 0}
    allowed = torch.tensor([i for i in range(text.vocab_size) if i not in special])

    def words(count: int) -> list[int]:
        return allowed[torch.randint(len(allowed), (count,), generator=generator)].tolist()

    block = [config.image_start_token_id] + [config.image_token_id] * num_image_tokens + [config.image_end_token_id]
    before, after = max(1, min(8, room // 2)), max(1, min(6, room // 2))
    documents = [
        [config.bos_token_id] + words(before) + block + words(after) + [config.eos_token_id],
        [config.bos_token_id] + words(max(1, before - 1)) + block + [config.eos_token_id],
        block + words(after) + [config.eos_token_id],
    ]
    input_ids, attention_mask = _pad(documents)
    prompt_lengths = [min(n, text.max_position_embeddings - 2) for n in (5, 3, 7)]
    prompt_ids, prompt_mask = _pad([[config.bos_token_id] + words(n) + [config.eos_token_id] for n in prompt_lengths])
    size = config.vision_config.image_size
    pixel_values = torch.randn(3, config.vision_config.num_channels, size, size, generator=generator)
    return VerificationInputs(input_ids, attention_mask, pixel_values, prompt_ids, prompt_mask)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise RuntimeError(f"Verification compared tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


@torch.no_grad()
def verify_conversion(
    source: dict[str, torch.Tensor], model: LCLForPreTraining, seed: int = 0
) -> dict[str, float]:
    """Max abs difference between the reference-equivalent forward on `source` and `model`, per output.

    Compared: image latents and image-token embeddings, zero-shot `<soi>` text features, the normalised
    contrastive features of the documents, generation logits at every real position, and the
    contrastive, generation and total losses. `model` must be in float32 and in eval mode, so that any
    difference comes from the conversion.
    """
    if model.dtype != torch.float32:
        raise ValueError(f"verify_conversion compares in float32; the model is in {model.dtype}.")
    if model.training:
        raise ValueError("verify_conversion needs the model in eval mode (call model.eval()).")
    config = model.config
    reference = _Reference(source, config)
    inputs = make_verification_inputs(config, seed)

    ref_pooled, ref_tokens = reference.encode_image(inputs.pixel_values)
    vision = model.lcl.vision_model(inputs.pixel_values)
    ref_hidden = reference.text_outputs(inputs.input_ids, ref_tokens)
    ref_losses = reference.losses(inputs.input_ids, ref_hidden, ref_pooled)
    out = model(inputs.input_ids, inputs.attention_mask, inputs.pixel_values, output_logits=True)

    # Zero-shot protocol: <eot> read as <soi>, the output there projected (padding after it is causal-invisible).
    prompts = torch.where(inputs.prompt_ids == config.eos_token_id, config.image_start_token_id, inputs.prompt_ids)
    ref_prompt_hidden = reference.text_outputs(prompts)
    ref_text_features = reference.project(ref_prompt_hidden[prompts == config.image_start_token_id])
    text_features = model.lcl.get_text_features(inputs.prompt_ids, inputs.prompt_mask)

    real = inputs.attention_mask.bool()
    return {
        "image_latents": _max_abs_diff(vision.image_latents, ref_pooled),
        "image_token_embeds": _max_abs_diff(vision.image_token_embeds, ref_tokens),
        "zero_shot_text_features": _max_abs_diff(text_features, ref_text_features),
        "contrastive_image_embeds": _max_abs_diff(out.image_embeds, ref_losses["image_embeds"]),
        "contrastive_text_embeds": _max_abs_diff(out.text_embeds, ref_losses["text_embeds"]),
        "generation_logits": _max_abs_diff(out.logits[real], reference.lm_logits(ref_hidden)[real]),
        "loss_contrastive": _max_abs_diff(out.loss_contrastive, ref_losses["loss_contrastive"]),
        "loss_generation": _max_abs_diff(out.loss_generation, ref_losses["loss_generation"]),
        "loss": _max_abs_diff(out.loss, ref_losses["loss"]),
    }


def check_verification(diffs: dict[str, float], tolerance: float = VERIFY_TOLERANCE) -> None:
    """Raise a ValueError listing every diff, failures marked, if any exceeds `tolerance` (or is NaN)."""
    failed = [name for name, diff in diffs.items() if not diff <= tolerance]
    if failed:
        rows = [f"  {name:<28} {diff:.3e}{'  FAILED' if name in failed else ''}" for name, diff in diffs.items()]
        table = "\n".join(rows)
        raise ValueError(f"Verification failed for {', '.join(failed)} (max abs diff > {tolerance:g}):\n{table}")


__all__ = ["VERIFY_TOLERANCE", "VerificationInputs", "check_verification", "make_verification_inputs", "verify_conversion"]
