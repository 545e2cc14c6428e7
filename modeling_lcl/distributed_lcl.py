"""The contrastive feature gather for several processes: features of all ranks, with gradients.

`LCLForPreTraining.contrastive_gather` is called with this rank's L2-normalised `(image, <soi>)` feature
pairs and returns a `loss_lcl.GatheredFeatures` holding the pairs of every rank. The loss then computes
the rows of this rank's images against the columns of all ranks ("local loss", as OpenCLIP's
`gather_with_grad=True, local_loss=True`), so every rank contributes its own share of the global mean.

Ranks hold different numbers of images (documents have 0..k images, and image-first pairs drop out of
the contrastive loss), so each rank pads its features to the largest count and the padding columns are
masked out through `GatheredFeatures.valid`.

Gradients: the gathered copy of rank s's features is used on every rank, so the gradient of rank s's
features is the sum over ranks of the gradient of their copy: the backward of the gather is a sum-reduce
of the full gradient, of which each rank keeps its own slice. With DDP averaging parameter gradients over
the W ranks, a trainer must multiply each rank's loss by W to train on the sum of the shares (i.e. the
global mean); `LCLTrainer` does.

The gather runs on its own process group so that its collectives, which happen inside the forward and
the backward pass, can never interleave with DDP's gradient all-reduces in a different order on
different ranks (ranks without images have a different autograd graph).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .loss_lcl import GatheredFeatures, gather_local


class _AllGatherWithGrad(torch.autograd.Function):
    """`(n, d)` on every rank -> `(world * n, d)`, rank r's rows at `[r * n, (r + 1) * n)`.

    Backward: each rank's gradient of the whole gathered tensor is summed over ranks (an all-reduce,
    which every backend has, unlike reduce-scatter on gloo) and each rank keeps the slice of its rows.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world_size = dist.get_world_size(group)
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(gathered, tensor, group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rows = grad.shape[0] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * rows : (rank + 1) * rows], None


class DistributedFeatureGather:
    """A `loss_lcl.FeatureGather` over all processes of `group` (default: every rank, on a dedicated group).

    It is a collective: every rank must call it at every forward pass that computes the loss, also with
    zero local pairs (the model does). Outside an initialised process group, or on one process, it
    falls back to `loss_lcl.gather_local`.

    Args:
        group (`torch.distributed.ProcessGroup`, *optional*):
            The ranks whose features form the global batch. Default: a new group over all ranks, created
            on first use (a collective itself, so the first call must happen on every rank, as it does).
    """

    def __init__(self, group: "dist.ProcessGroup | None" = None):
        self._group = group

    @property
    def group(self):
        if self._group is None:
            # A group of its own (see the module docstring); the default backend of the world.
            self._group = dist.new_group(backend=dist.get_backend())
        return self._group

    def __call__(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> GatheredFeatures:
        """`(num_local, dim)` image and `<soi>` features -> the padded features of every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return gather_local(image_embeds, text_embeds)
        if image_embeds.shape != text_embeds.shape:
            raise ValueError(
                f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must pair row by row."
            )
        group = self.group
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        num_local, dim = image_embeds.shape

        counts = torch.tensor([num_local], device=image_embeds.device)
        all_counts = counts.new_empty(world_size)
        dist.all_gather_into_tensor(all_counts, counts, group=group)
        max_count = int(all_counts.max())
        if max_count == 0:
            # No rank has a pair: nothing to contrast (the same decision on every rank, from the same counts).
            return gather_local(image_embeds, text_embeds)

        # One collective for both features: (num_local, 2 * dim), padded to (max_count, 2 * dim).
        pairs = F.pad(torch.cat([image_embeds, text_embeds], dim=-1), (0, 0, 0, max_count - num_local))
        if torch.is_grad_enabled() and not pairs.requires_grad:
            # A rank without images must still join the backward collective that the other ranks run.
            pairs.requires_grad_()
        gathered = _AllGatherWithGrad.apply(pairs, group)  # (world_size * max_count, 2 * dim)

        slots = torch.arange(max_count, device=all_counts.device)
        valid = (slots[None, :] < all_counts[:, None]).flatten().to(image_embeds.device)
        return GatheredFeatures(gathered[:, :dim], gathered[:, dim:], valid, rank * max_count)


__all__ = ["DistributedFeatureGather"]
