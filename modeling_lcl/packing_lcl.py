"""Packing: run the causal transformer only on the prefixes of a batch that the loss reads.

Training reads the causal outputs at two kinds of positions: those whose next token is a generation target,
and the `<soi>` tokens of the contrastive loss. Under causal attention an output depends only on the tokens
before it, so everything after a sequence's last read position is computed for nothing. In a text-first pair
`<sot> caption <soi> <img>×N <eoi>` that is the whole image block (N + 1 of its ~N + 16 tokens); in every
sequence it is at least the last token, whose target is padding.

`plan_packing` places those prefixes, best-fit decreasing, into rows no longer than the longest prefix, so a
packed batch never holds more tokens (nor longer attention rows) than the padded one. Every prefix keeps its
own position ids `0, 1, ...`: transformers' mask builder reads the segment boundaries from them
(`masking_utils.find_packed_sequence_indices`) and builds the block-diagonal causal mask, and its flash-attention
path takes them as variable-length boundaries. Each kept token then goes through the same computation as in the
padded batch. Unused slots at the end of a row form a segment of their own; their outputs are dropped.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackingPlan:
    """Where each kept token of a `(batch_size, sequence_length)` batch sits in `(num_rows, row_length)` rows.

    source_index: `(num_kept,)` flat index `b * sequence_length + t` of each kept token in the batch.
    packed_index: `(num_kept,)` flat index `r * row_length + c` of the same token in the packed rows.
    position_ids: `(num_rows, row_length)` position of every packed slot inside its own segment.
    """

    batch_shape: tuple[int, int]
    packed_shape: tuple[int, int]
    source_index: torch.Tensor
    packed_index: torch.Tensor
    position_ids: torch.Tensor

    def pack(self, batch: torch.Tensor) -> torch.Tensor:
        """`(batch_size, sequence_length, ...)` -> `(num_rows, row_length, ...)`, zeros in unused slots."""
        flat, rest = batch.reshape(-1, *batch.shape[2:]), batch.shape[2:]
        packed = flat.new_zeros(self.packed_shape[0] * self.packed_shape[1], *rest)
        packed = packed.index_copy(0, self.packed_index, flat.index_select(0, self.source_index))
        return packed.view(*self.packed_shape, *rest)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`(num_rows, row_length, ...)` -> `(batch_size, sequence_length, ...)`, zeros outside the prefixes."""
        flat, rest = packed.reshape(-1, *packed.shape[2:]), packed.shape[2:]
        batch = flat.new_zeros(self.batch_shape[0] * self.batch_shape[1], *rest)
        batch = batch.index_copy(0, self.source_index, flat.index_select(0, self.packed_index))
        return batch.view(*self.batch_shape, *rest)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> tuple[list[tuple[int, int] | None], list[int]]:
    """Place items of `lengths` into bins of `capacity`: longest first, each into the bin it fills best.

    Returns `(placement, fills)`: `placement[i] = (bin, offset)`, or `None` for an empty item, and the filled
    length of each bin. Bins are found by their free room (at most `capacity` buckets), not by a scan of all
    bins, so a micro-batch of thousands of pairs packs in milliseconds.
    """
    placement: list[tuple[int, int] | None] = [None] * len(lengths)
    fills: list[int] = []
    bins_by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep batch order
        length = lengths[item]
        if length == 0:
            continue
        room = next((room for room in range(length, capacity + 1) if bins_by_room[room]), None)
        if room is None:
            fills.append(0)
            chosen = len(fills) - 1
        else:
            chosen = bins_by_room[room].pop()
        placement[item] = (chosen, fills[chosen])
        fills[chosen] += length
        bins_by_room[capacity - fills[chosen]].append(chosen)
    return placement, fills


def plan_packing(prefix_lengths: Sequence[int], sequence_length: int, device=None) -> PackingPlan:
    """The packing of the first `prefix_lengths[b]` tokens of each row of a `(batch_size, sequence_length)` batch.

    Rows hold at most `max(prefix_lengths)` tokens. A batch whose prefixes are all empty gets one row of one
    unused slot, so the causal transformer still runs (and every rank of a distributed step calls it alike).
    """
    lengths = [int(n) for n in prefix_lengths]
    outside = [(row, n) for row, n in enumerate(lengths) if not 0 <= n <= sequence_length]
    if outside:
        row, n = outside[0]
        raise ValueError(
            f"prefix lengths must lie in [0, {sequence_length}] (the sequence length), got {n} for row {row}"
            f"{f' and {len(outside) - 1} more rows' if len(outside) > 1 else ''}."
        )
    capacity = max(lengths, default=0)
    placement, fills = best_fit_decreasing(lengths, capacity)
    if not fills:
        fills = [0]
    row_length = max(capacity, 1)

    kept = [b for b, place in enumerate(placement) if place is not None]
    kept_lengths = torch.tensor([lengths[b] for b in kept], dtype=torch.long)
    starts_in_batch = torch.tensor([b * sequence_length for b in kept], dtype=torch.long)
    starts_in_rows = torch.tensor([placement[b][0] * row_length + placement[b][1] for b in kept], dtype=torch.long)
    # Position of each kept token inside its prefix: 0..n-1 for every kept row, end to end.
    first_token = torch.cumsum(kept_lengths, 0) - kept_lengths
    offsets = torch.arange(int(kept_lengths.sum())) - torch.repeat_interleave(first_token, kept_lengths)
    source_index = torch.repeat_interleave(starts_in_batch, kept_lengths) + offsets
    packed_index = torch.repeat_interleave(starts_in_rows, kept_lengths) + offsets

    # Unused slots after a row's last prefix count 0, 1, ... as a segment of their own.
    position_ids = (torch.arange(row_length)[None] - torch.tensor(fills)[:, None]).clamp(min=0)
    position_ids.view(-1)[packed_index] = offsets
    return PackingPlan(
        batch_shape=(len(lengths), sequence_length),
        packed_shape=(len(fills), row_length),
        source_index=source_index.to(device),
        packed_index=packed_index.to(device),
        position_ids=position_ids.to(device),
    )


__all__ = ["PackingPlan", "best_fit_decreasing", "plan_packing"]
