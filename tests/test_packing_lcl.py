"""Packed prefixes: the packing plan, the prefixes the loss reads, and packed training steps that equal the
padded ones (losses, gradients, hidden states)."""

import copy

import pytest
import torch
from conftest import EOI, EOT, IMG, SOI, SOT, image_block, mixed_documents, pad_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import find_packed_sequence_indices

from modeling_lcl import LCLForPreTraining
from modeling_lcl.loss_lcl import loss_prefix_lengths
from modeling_lcl.packing_lcl import best_fit_decreasing, plan_packing

# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def test_best_fit_decreasing_puts_each_item_where_it_fills_a_bin_best():
    placement, fills = best_fit_decreasing([5, 3, 2, 4, 1, 0], capacity=5)
    # Longest first: 5 opens bin 0, 4 opens bin 1, 3 opens bin 2, 2 fits bin 2 (room 2) best, 1 fits bin 1.
    assert placement == [(0, 0), (2, 0), (2, 3), (1, 0), (1, 4), None]
    assert fills == [5, 5, 5]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40))
def test_best_fit_decreasing_places_every_item_once_without_overlap(lengths):
    capacity = max(lengths)
    placement, fills = best_fit_decreasing(lengths, capacity)
    assert all(fill <= capacity for fill in fills)
    occupied = {}
    for item, place in enumerate(placement):
        if lengths[item] == 0:
            assert place is None
            continue
        row, offset = place
        for column in range(offset, offset + lengths[item]):
            assert (row, column) not in occupied
            occupied[row, column] = item
    # Each bin is filled from its start without gaps, and never holds more than one item's worth of waste.
    for row, fill in enumerate(fills):
        assert {column for r, column in occupied if r == row} == set(range(fill))
    assert len(fills) <= sum(1 for n in lengths if n)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=10))
def test_pack_then_unpack_keeps_the_prefixes_and_zeroes_the_rest(lengths):
    sequence_length = 12
    batch = torch.randn(len(lengths), sequence_length, 3)
    plan = plan_packing(lengths, sequence_length)
    rows, row_length = plan.packed_shape
    assert row_length == max(max(lengths), 1)
    assert rows * row_length >= sum(lengths)
    restored = plan.unpack(plan.pack(batch))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(restored[b, :n], batch[b, :n], rtol=0, atol=0)
        assert not restored[b, n:].any()


def test_position_ids_restart_in_every_segment_so_transformers_finds_the_boundaries():
    lengths = [6, 2, 3, 0, 4]
    plan = plan_packing(lengths, 8)
    # Best fit into rows of 6: [6], [4 + 2], [3 + 3 unused slots].
    assert plan.packed_shape == (3, 6)
    assert plan.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    segments = find_packed_sequence_indices(plan.position_ids)
    assert segments.tolist() == [[0] * 6, [0] * 4 + [1] * 2, [0] * 3 + [1] * 3]
    # Each kept token sits at its own position inside its prefix.
    packed_positions = plan.position_ids.view(-1)[plan.packed_index]
    assert packed_positions.tolist() == (plan.source_index % 8).tolist()


def test_a_batch_with_nothing_to_read_still_gets_one_row():
    plan = plan_packing([0, 0], 5)
    assert plan.packed_shape == (1, 1) and plan.source_index.numel() == 0
    assert not plan.unpack(plan.pack(torch.randn(2, 5, 4))).any()


def test_prefix_lengths_outside_the_sequence_are_rejected():
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\] \(the sequence length\), got 5 for row 1\.$"):
        plan_packing([2, 5], 4)
    with pytest.raises(ValueError, match=r"got -1 for row 0 and 1 more rows"):
        plan_packing([-1, 3, 9], 4)


# ---------------------------------------------------------------------------------------------
# What the loss reads
# ---------------------------------------------------------------------------------------------


def test_prefixes_end_at_the_last_position_a_loss_reads(config):
    n = config.num_image_tokens
    sequences, _ = mixed_documents(n)
    input_ids, attention_mask = pad_batch(sequences)
    lengths = loss_prefix_lengths(input_ids, attention_mask, IMG, EOI, SOI).tolist()
    assert lengths == [
        5,  # text first: <sot> 5 6 7 <soi>; the image block after its <soi> is never read
        6,  # text first: <sot> 8 0 9 10 <soi>
        (n + 2) + 3,  # image first: the block, 11 12 13, not the final <eot> (its target is padding)
        len(sequences[3]) - 1,  # interleaved: up to the token before the final <eot>
    ]
    contrastive_only = loss_prefix_lengths(input_ids, attention_mask, IMG, EOI, SOI, generation=False).tolist()
    # Up to each sequence's last non-initial <soi>: none in the image-first pair, the second one in the document.
    assert contrastive_only == [5, 6, 0, 3 + (n + 2) + 2 + 1]


# ---------------------------------------------------------------------------------------------
# Packed steps equal padded steps
# ---------------------------------------------------------------------------------------------


def _loss_and_gradients(model, batch, **kwargs):
    model.zero_grad()
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same_step(padded, packed, atol=1e-6):
    (out, grads), (out_packed, grads_packed) = padded, packed
    for name in ("loss", "loss_contrastive", "loss_generation", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(out_packed, name), getattr(out, name), atol=atol, rtol=1e-5)
    assert out_packed.num_generation_targets == out.num_generation_targets
    assert out_packed.num_contrastive_pairs == out.num_contrastive_pairs
    assert grads_packed.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_packed[name], grads[name], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_step_equals_the_padded_step(config, batch, attention):
    torch.manual_seed(0)
    model = LCLForPreTraining(config).train()
    model.set_attn_implementation(attention)
    _assert_same_step(_loss_and_gradients(model, batch), _loss_and_gradients(model, batch, pack_sequences=True))


def test_packed_step_runs_the_causal_transformer_on_fewer_tokens(config, batch):
    model = LCLForPreTraining(config).train()
    shapes = []
    model.lcl.text_model.register_forward_hook(lambda module, args, kwargs, out: shapes.append(
        (tuple(kwargs["inputs_embeds"].shape[:2]), kwargs.get("attention_mask"))), with_kwargs=True)
    model(**batch, pack_sequences=True)
    (rows, row_length), mask = shapes[0]
    batch_size, length = batch["input_ids"].shape
    assert row_length < length and rows < batch_size and mask is None  # the mask comes from the position ids


def test_packed_hidden_states_equal_the_padded_ones_inside_the_prefixes(config, batch):
    model = LCLForPreTraining(config).eval()
    padded = model(**batch).last_hidden_state
    packed = model(**batch, pack_sequences=True).last_hidden_state
    lengths = loss_prefix_lengths(batch["input_ids"], batch["attention_mask"], IMG, EOI, SOI)
    inside = torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]
    torch.testing.assert_close(packed[inside], padded[inside], atol=1e-6, rtol=1e-5)
    assert not packed[~inside].any()


def test_packed_contrastive_only_step_drops_image_first_pairs_from_the_causal_transformer(config):
    torch.manual_seed(0)
    n = config.num_image_tokens
    input_ids, attention_mask = pad_batch(
        [[SOT, 5, 6] + image_block(n), image_block(n) + [7, 8, EOT], [SOT, 9] + image_block(n)]
    )
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.randn(3, 3, 16, 16)}
    model = LCLForPreTraining(config).train()
    model.lm_head.requires_grad_(False)
    weights = {"generation_loss_weight": 0.0}
    packed = _loss_and_gradients(model, batch, pack_sequences=True, **weights)
    _assert_same_step(_loss_and_gradients(model, batch, **weights), packed)
    assert packed[0].loss_generation is None


def test_packed_step_with_gradient_checkpointing(config, batch):
    torch.manual_seed(0)
    model = LCLForPreTraining(config).train()
    padded = _loss_and_gradients(model, batch)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _assert_same_step(padded, _loss_and_gradients(checkpointed, batch, pack_sequences=True))


def test_packing_is_refused_where_outputs_outside_the_prefixes_are_asked_for(config, batch):
    model = LCLForPreTraining(config).eval()
    with pytest.raises(ValueError, match="pack_sequences .* needs return_loss=True and output_logits=False"):
        model(**batch, pack_sequences=True, output_logits=True)
    with pytest.raises(ValueError, match="pack_sequences .* needs return_loss=True"):
        model(**batch, pack_sequences=True, return_loss=False)
    with pytest.raises(ValueError, match="cannot be combined with a cache, use_cache, position_ids or output_hidden"):
        model(**batch, pack_sequences=True, output_hidden_states=True)
    lengths = torch.full((batch["input_ids"].shape[0],), 3)
    with pytest.raises(ValueError, match="cannot be combined"):
        model.lcl(**batch, prefix_lengths=lengths, use_cache=True)
