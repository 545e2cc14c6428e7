"""The two halves of the LCL objective, kept apart from the model so they can be checked by hand
and so a distributed feature gather plugs in without touching the formula.

`L = λ_gen · L_gen + λ_con · L_con`

- `L_gen`: next-token cross-entropy on every position whose *target* is a real token other than
  `<img>` or `<eoi>` (targets `<soi>` and `<eot>` are kept).
- `L_con`: symmetric InfoNCE between the causal output at each `<soi>` that is not the first token of
  its sequence and the pooled latent of the image that follows it.
"""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class GatheredFeatures(NamedTuple):
    """What a gather hands back to the contrastive loss.

    image_embeds: `(total, dim)` features of every rank (padded rows included).
    text_embeds: `(total, dim)` likewise.
    valid: `(total,)` bool, False on padding rows of ranks that hold fewer images.
    offset: row index of this rank's first feature inside `image_embeds`.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    valid: torch.Tensor
    offset: int


FeatureGather = Callable[[torch.Tensor, torch.Tensor], GatheredFeatures]


def gather_local(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> GatheredFeatures:
    """The single-process gather: the global batch is the local batch."""
    valid = torch.ones(image_embeds.shape[0], dtype=torch.bool, device=image_embeds.device)
    return GatheredFeatures(image_embeds, text_embeds, valid, 0)


def contrastive_loss_terms(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: FeatureGather = gather_local,
) -> tuple[torch.Tensor, int]:
    """Sum over this rank's images of the symmetric InfoNCE terms, and how many rows were summed.

    Args:
        image_embeds: `(num_local, dim)` L2-normalised pooled latents.
        text_embeds: `(num_local, dim)` L2-normalised `<soi>` features, row i paired with image i.
        logit_scale: scalar, log of the inverse temperature.
        gather: returns the features of all ranks (see `GatheredFeatures`); it is always called,
            also with zero local rows, because on several processes it is a collective.

    Returns `(sum of (ce_i2t + ce_t2i) / 2 over local rows, num_local)`; the caller divides by the
    global number of images so that every rank's share adds up to the global mean.
    """
    world = gather(image_embeds, text_embeds)
    scale = logit_scale.exp()
    # Local rows against all columns ("local loss"): each rank computes only its own images' rows.
    logits_per_image = scale * image_embeds.float() @ world.text_embeds.float().T
    logits_per_text = scale * text_embeds.float() @ world.image_embeds.float().T
    padding = ~world.valid
    logits_per_image = logits_per_image.masked_fill(padding, float("-inf"))
    logits_per_text = logits_per_text.masked_fill(padding, float("-inf"))
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + world.offset
    loss_sum = (
        F.cross_entropy(logits_per_image, targets, reduction="sum")
        + F.cross_entropy(logits_per_text, targets, reduction="sum")
    ) / 2
    return loss_sum, image_embeds.shape[0]


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean symmetric InfoNCE on one process; 0 (still attached to the graph) when there are no pairs."""
    loss_sum, count = contrastive_loss_terms(image_embeds, text_embeds, logit_scale)
    if count == 0:
        return loss_sum + 0.0 * logit_scale
    return loss_sum / count


def _cross_entropy_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def generation_loss_sum(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Sum of the next-token cross-entropy of `head(hidden)` `(num_targets, vocab)` against `targets`.

    Above `chunk_size` targets the logits are built chunk by chunk and rebuilt in the backward pass
    (activation checkpointing), so only one chunk's `(chunk_size, vocab)` logits are alive at a time:
    an MMC4 batch (context 2048) has ~15k targets, i.e. 3 GB of fp32 logits, plus as much again for
    their log-softmax and its gradient, when built at once.
    """
    if hidden.shape[0] <= chunk_size:
        return _cross_entropy_sum(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(_cross_entropy_sum, head, hidden[chunk], targets[chunk], use_reentrant=False)
    return total


def generation_target_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    image_end_token_id: int,
) -> torch.Tensor:
    """`(batch, seq_len - 1)` bool: True where the output at t is trained to predict token t + 1.

    Excluded targets: `<img>` (its embedding comes from the image, there is nothing to predict),
    `<eoi>` (always follows the block) and padding.
    """
    targets = input_ids[:, 1:]
    return (
        attention_mask[:, 1:].bool()
        & attention_mask[:, :-1].bool()
        & (targets != image_token_id)
        & (targets != image_end_token_id)
    )


def contrastive_soi_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_start_token_id: int):
    """`(batch, seq_len)` bool: the `<soi>` tokens that enter the contrastive loss.

    A `<soi>` that is the first real token of its sequence has seen no context, so it is skipped (its
    image is then only captioned). "First" is counted on `attention_mask`, so left padding works too.
    """
    position_in_sequence = attention_mask.long().cumsum(-1) - 1
    return (input_ids == image_start_token_id) & attention_mask.bool() & (position_in_sequence > 0)


def loss_prefix_lengths(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    image_end_token_id: int,
    image_start_token_id: int,
    generation: bool = True,
    contrastive: bool = True,
) -> torch.Tensor:
    """`(batch,)` long: how many leading positions of each sequence the two losses read.

    The generation loss reads the output at t when token t + 1 is a target, the contrastive loss the output at
    each `<soi>` of `contrastive_soi_mask`. A causal output depends on no later token, so a sequence's outputs up
    to its last read position are all the losses need (0 when it has none, e.g. an image-first pair in a
    contrastive-only run). Pass `generation=False` / `contrastive=False` for a loss that is not computed.
    """
    read = torch.zeros_like(input_ids, dtype=torch.bool)
    if contrastive:
        read |= contrastive_soi_mask(input_ids, attention_mask, image_start_token_id)
    if generation:
        read[:, :-1] |= generation_target_mask(input_ids, attention_mask, image_token_id, image_end_token_id)
    positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return (read * positions).amax(-1)


__all__ = [
    "loss_prefix_lengths",
    "generation_loss_sum",
    "GatheredFeatures",
    "FeatureGather",
    "gather_local",
    "contrastive_loss_terms",
    "contrastive_loss",
    "generation_target_mask",
    "contrastive_soi_mask",
]
