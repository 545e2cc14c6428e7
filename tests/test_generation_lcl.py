"""LCLForConditionalGeneration: captioning with GenerationMixin (KV cache, greedy, beam search)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import EOI, EOT, IMG, SOI, image_block
from torch import nn
from transformers import AutoModelForImageTextToText

from modeling_lcl import LCLForPreTraining
from modeling_lcl.modeling_lcl_tasks import LCLForConditionalGeneration

NEW_TOKENS = 6


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return LCLForConditionalGeneration(config).eval()


def left_pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad with 0 (generation continues every row from its last column)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = torch.tensor(seq)
        attention_mask[row, length - len(seq) :] = 1
    return input_ids, attention_mask


def caption_prompts(config) -> tuple[list[list[int]], torch.Tensor]:
    """Image-first prompts: no prefix, a 2-token prefix, and two images with text between them."""
    block = image_block(config.num_image_tokens)
    torch.manual_seed(1)
    return [block, block + [5, 6], block + [7] + block + [8, 9]], torch.randn(4, 3, 16, 16)


def generate(model, sequences, pixel_values, **kwargs) -> torch.Tensor:
    input_ids, attention_mask = left_pad(sequences)
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        **kwargs,
    )


def images_of(sequences, pixel_values, row) -> torch.Tensor:
    counts = [seq.count(SOI) for seq in sequences]
    start = sum(counts[:row])
    return pixel_values[start : start + counts[row]]


def test_pretraining_checkpoint_loads_unchanged(config, tmp_path):
    torch.manual_seed(0)
    pretrained = LCLForPreTraining(config).eval()
    pretrained.save_pretrained(tmp_path)
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, LCLForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sequences, pixel_values = caption_prompts(config)
    input_ids, attention_mask = left_pad(sequences[1:2])
    with torch.no_grad():
        expected = pretrained(input_ids, attention_mask, images_of(sequences, pixel_values, 1), return_loss=False)
        logits = model.eval()(input_ids, attention_mask, images_of(sequences, pixel_values, 1)).logits
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=0)


def test_cached_and_uncached_greedy_decoding_give_the_same_tokens(model, config):
    sequences, pixel_values = caption_prompts(config)
    cached = generate(model, sequences, pixel_values, do_sample=False, use_cache=True)
    uncached = generate(model, sequences, pixel_values, do_sample=False, use_cache=False)
    assert cached.shape == (3, max(map(len, sequences)) + NEW_TOKENS)
    assert torch.equal(cached, uncached)


def test_output_starts_with_the_prompt_and_batching_changes_nothing(model, config):
    sequences, pixel_values = caption_prompts(config)
    batched = generate(model, sequences, pixel_values, do_sample=False)
    input_ids, _ = left_pad(sequences)
    assert torch.equal(batched[:, : input_ids.shape[1]], input_ids)
    for row, seq in enumerate(sequences):
        alone = generate(model, [seq], images_of(sequences, pixel_values, row), do_sample=False)
        # Left padding must not shift the learned positions (generate derives them from the mask).
        assert torch.equal(alone[0, len(seq) :], batched[row, input_ids.shape[1] :])


def test_expanded_samples_keep_their_own_images(model, config):
    # Top-1 sampling is greedy decoding, so all 3 returned sequences of a sample must be its greedy output.
    # The last sample has two images (a, b): a row-by-row repeat of pixel_values (a, a, a, b, b, b) would
    # give its copies the pairs (a, a), (a, b), (b, b) instead of (a, b) three times.
    sequences, pixel_values = caption_prompts(config)
    greedy = generate(model, sequences, pixel_values, do_sample=False)
    repeated = generate(model, sequences, pixel_values, do_sample=True, top_k=1, num_return_sequences=3)
    assert torch.equal(repeated, greedy.repeat_interleave(3, dim=0))


def test_beam_search_in_a_batch_equals_beam_search_per_sample(model, config):
    sequences, pixel_values = caption_prompts(config)
    kwargs = dict(num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    batched = generate(model, sequences, pixel_values, **kwargs)
    assert batched.shape[0] == 3 * 2
    width = max(map(len, sequences))
    for row, seq in enumerate(sequences):
        alone = generate(model, [seq], images_of(sequences, pixel_values, row), **kwargs)
        assert torch.equal(alone[:, len(seq) :], batched[2 * row : 2 * row + 2, width:])
    beam_top = batched[::2, width:]
    # Beam search is not greedy search in general; at least it must produce real text tokens.
    assert not torch.isin(beam_top, torch.tensor([SOI, IMG, EOI])).any()


def test_images_are_encoded_once_with_a_cache_and_every_step_without(model, config):
    sequences, pixel_values = caption_prompts(config)
    calls = []
    hook = model.lcl.vision_model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        generate(model, sequences, pixel_values, do_sample=False, use_cache=True)
        assert calls == [4]
        calls.clear()
        generate(model, sequences, pixel_values, do_sample=False, use_cache=False)
        assert calls == [4] * NEW_TOKENS
    finally:
        hook.remove()


def test_image_block_tokens_are_never_generated(config, tmp_path):
    torch.manual_seed(0)
    LCLForPreTraining(config).save_pretrained(tmp_path)
    model = LCLForConditionalGeneration.from_pretrained(tmp_path).eval()
    # A pre-training checkpoint has no generation config: the suppression comes from the class default.
    assert set(model.generation_config.suppress_tokens) == {SOI, IMG, EOI}
    # Make <soi> the head's favourite: constant LayerNorm output, only <soi>'s (then <img>'s) row non-zero.
    with torch.no_grad():
        model.lm_head.layer_norm.weight.zero_()
        model.lm_head.layer_norm.bias.fill_(1.0)
        model.lm_head.proj.weight.zero_()
        model.lm_head.proj.weight[SOI] = 3.0
        model.lm_head.proj.weight[IMG] = 2.0
        model.lm_head.proj.weight[EOI] = 2.0
        model.lm_head.proj.weight[EOT] = 1.0
    sequences, pixel_values = caption_prompts(config)
    input_ids, attention_mask = left_pad(sequences)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         max_new_tokens=3, do_sample=False)
    assert (out[:, input_ids.shape[1]] == EOT).all()


def test_rows_that_finish_early_are_padded_with_eot_not_token_0(model, config, tmp_path):
    assert config.pad_token_id == 0 and model.generation_config.pad_token_id == EOT
    sequences, pixel_values = caption_prompts(config)
    greedy = generate(model, sequences, pixel_values)
    prompt_length = greedy.shape[1] - NEW_TOKENS
    first_of_row0 = int(greedy[0, prompt_length])
    # Make row 0's first new token its end of sequence: its later columns are then padding.
    input_ids, attention_mask = left_pad(sequences)
    stopped = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             max_new_tokens=NEW_TOKENS, eos_token_id=first_of_row0)  # fmt: skip
    row0 = stopped[0, prompt_length + 1 :]
    assert row0.numel() > 0 and (row0 == EOT).all()
    model.save_pretrained(tmp_path)
    assert LCLForConditionalGeneration.from_pretrained(tmp_path).generation_config.pad_token_id == EOT


def test_labels_give_the_mean_next_token_cross_entropy(model, config):
    sequences, pixel_values = caption_prompts(config)
    input_ids, attention_mask = left_pad(sequences[1:2] + [image_block(config.num_image_tokens) + [5, 6, 7, EOT]])
    pixel_values = pixel_values[:2]
    labels = input_ids.masked_fill(~attention_mask.bool() | (input_ids == IMG) | (input_ids == EOI), -100)
    out = model(input_ids, attention_mask, pixel_values, labels=labels, logits_to_keep=1)
    # logits_to_keep is ignored under labels: the loss needs every position.
    assert out.logits.shape[:2] == input_ids.shape
    targets = labels[:, 1:]
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.lcl.vision_model.pooler.v_proj.weight.grad.abs().sum() > 0


def test_logits_to_keep_and_cache_output(model, config):
    sequences, pixel_values = caption_prompts(config)
    input_ids, attention_mask = left_pad(sequences[:1])
    with torch.no_grad():
        out = model(input_ids, attention_mask, pixel_values[:1], use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (1, 1, config.vocab_size)
    assert out.cache.get_seq_length() == input_ids.shape[1]


def test_images_without_image_blocks_are_rejected(model):
    with pytest.raises(ValueError, match="no <img> placeholder tokens"):
        model(torch.tensor([[5, 6, 7]]), pixel_values=torch.randn(1, 3, 16, 16))


def test_output_embeddings_are_the_lm_head_projection(model):
    assert model.get_output_embeddings() is model.lm_head.proj
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert model.can_generate()
