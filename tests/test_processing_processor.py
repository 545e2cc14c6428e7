"""LCLProcessor: layouts, truncation, padding, bad input, Auto round trip, contract with the model."""

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoProcessor

from modeling_lcl import LCLConfig, LCLForPreTraining
from processing import LCLImageProcessor, LCLProcessor, build_test_tokenizer

N = 4  # image tokens per image in these tests (a 16 px image in 8 px patches)


@pytest.fixture(scope="module")
def tokenizer():
    return build_test_tokenizer()


def make_processor(tokenizer, num_image_tokens=N, max_length=32, **kwargs) -> LCLProcessor:
    return LCLProcessor(
        image_processor=LCLImageProcessor(size=16, crop_size=16),
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens,
        max_length=max_length,
        **kwargs,
    )


@pytest.fixture(scope="module")
def proc(tokenizer):
    return make_processor(tokenizer)


def color_image(index: int, size=(20, 12), mode="RGB") -> PIL.Image.Image:
    """A solid image whose red value encodes `index` (read back from pixel_values by `image_index`)."""
    return PIL.Image.new("RGB", size, (10 * index + 5, 0, 0)).convert(mode)


def image_index(pixel_values: torch.Tensor) -> int:
    red = pixel_values[0, 0, 0].item() * 0.26862954 + 0.48145466
    return round((red * 255 - 5) / 10)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def ids(proc) -> dict:
    return proc.special_token_ids()


def block(proc) -> list[int]:
    special = ids(proc)
    return (
        [special["image_start_token_id"]]
        + [special["image_token_id"]] * proc.num_image_tokens
        + [special["image_end_token_id"]]
    )


def real(batch, row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def test_special_token_ids_build_a_matching_config(proc, tokenizer):
    special = proc.special_token_ids()
    assert set(special) == {
        "image_token_id", "image_start_token_id", "image_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
    }  # fmt: skip
    assert special["image_token_id"] == tokenizer.image_token_id and special["pad_token_id"] == 0
    config = LCLConfig(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32),
        projection_dim=32, pooler_num_attention_heads=2, **special,
    )  # fmt: skip
    assert config.num_image_tokens == proc.num_image_tokens


def test_interleaved_document_layout(proc, tokenizer):
    special = ids(proc)
    batch = proc(documents=[["the cat", color_image(1), "on the beach", color_image(2), "sunset"]])
    expected = (
        [special["bos_token_id"]] + text_ids(tokenizer, "the cat") + block(proc) + text_ids(tokenizer, "on the beach")
        + block(proc) + text_ids(tokenizer, "sunset") + [special["eos_token_id"]]
    )  # fmt: skip
    assert real(batch, 0) == expected
    assert batch["image_counts"].tolist() == [2]
    assert [image_index(p) for p in batch["pixel_values"]] == [1, 2]


def test_pair_layouts_are_exact(proc, tokenizer):
    special = ids(proc)
    caption = text_ids(tokenizer, "a dog on the beach")
    text_first = proc(images=[color_image(0)], text=["a dog on the beach"], image_first_prob=0.0)
    assert real(text_first, 0) == [special["bos_token_id"]] + caption + block(proc)  # no <eot>
    image_first = proc(images=[color_image(0)], text=["a dog on the beach"], image_first_prob=1.0)
    assert real(image_first, 0) == block(proc) + caption + [special["eos_token_id"]]  # no <sot>


def test_caption_truncated_to_leave_room_for_the_block(tokenizer):
    proc = make_processor(tokenizer, max_length=N + 10)  # caption budget: max_length - N - 4 = 6 tokens
    caption = " ".join(["beautiful mountain river"] * 10)
    full = text_ids(tokenizer, caption)
    for prob, head, tail in [
        (0.0, [proc.special_token_ids()["bos_token_id"]], block(proc)),
        (1.0, block(proc), [proc.special_token_ids()["eos_token_id"]]),
    ]:
        batch = proc(images=[color_image(0)], text=[caption], image_first_prob=prob)
        assert real(batch, 0) == head + full[:6] + tail
        assert batch["image_counts"].tolist() == [1]


def test_image_first_draws_follow_the_generator(proc):
    images, texts = [color_image(i) for i in range(64)], ["a cat"] * 64
    soi = proc.special_token_ids()["image_start_token_id"]

    def image_first(generator):
        batch = proc(images=images, text=texts, generator=generator)
        return (batch["input_ids"][:, 0] == soi).tolist()

    first = image_first(torch.Generator().manual_seed(7))
    assert first == image_first(torch.Generator().manual_seed(7))
    assert first != image_first(torch.Generator().manual_seed(8))
    assert 10 < sum(first) < 54  # about half, with p = 0.5
    assert not any(
        image_first_draw
        for image_first_draw in proc(images=images, text=texts, image_first_prob=0.0)["input_ids"][:, 0]
        .eq(soi)
        .tolist()
    )


def test_prompts(proc, tokenizer):
    special = ids(proc)
    batch = proc(text=["a photo of a 3", "cat"])
    assert real(batch, 0) == [special["bos_token_id"]] + text_ids(tokenizer, "a photo of a 3") + [
        special["eos_token_id"]
    ]
    assert set(batch) == {"input_ids", "attention_mask"}
    long = proc(text=[" ".join(["word"] * 100)])
    assert long["input_ids"].shape[1] == proc.max_length and real(long, 0)[-1] == special["eos_token_id"]


def test_images_alone_give_pixel_values(proc):
    batch = proc(images=[color_image(0), color_image(1)])
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (2, 3, 16, 16)


def test_text_with_image_markers(proc, tokenizer):
    marked = proc(text=["the <image> cat <image>", "no image here"], images=[color_image(3), color_image(4)])
    segments = proc(documents=[["the ", color_image(3), " cat ", color_image(4)], ["no image here"]])
    torch.testing.assert_close(marked["input_ids"], segments["input_ids"])
    assert marked["image_counts"].tolist() == [2, 0]
    nested = proc(text=["the <image> cat <image>", "no image here"], images=[[color_image(3), color_image(4)], []])
    torch.testing.assert_close(nested["input_ids"], marked["input_ids"])


def test_single_document_without_batch_nesting(proc):
    batch = proc(documents=["a cat", color_image(0)])
    assert batch["input_ids"].shape[0] == 1 and batch["image_counts"].tolist() == [1]


# ----------------------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------------------


def document_of_length(proc, tokenizer, prefix_tokens: int, num_images: int = 1) -> list:
    """Text of exactly `prefix_tokens` tokens ("one" is a single token), then the images and text."""
    assert text_ids(tokenizer, "one") and len(text_ids(tokenizer, "one one")) == 2
    segments = [" ".join(["one"] * prefix_tokens)] if prefix_tokens else []
    for index in range(num_images):
        segments += [color_image(index), "two"]
    return segments


@pytest.mark.parametrize("prefix", range(0, 30))
def test_truncation_never_leaves_a_partial_block(tokenizer, prefix):
    """Sweep the block across the cut: it is either whole, or gone with its image, and <eot> ends the text."""
    proc = make_processor(tokenizer, max_length=20)
    special = ids(proc)
    document = document_of_length(proc, tokenizer, prefix)
    batch = proc(documents=[document])
    sequence = real(batch, 0)
    full_length = 1 + prefix + (N + 2) + 1 + 1  # <sot> prefix block "two" <eot>
    assert len(sequence) <= 20 and sequence[-1] == special["eos_token_id"]
    block_fits = 1 + prefix + N + 2 <= 19  # the whole block must end before the final <eot> slot
    if full_length <= 20:
        assert sequence == [special["bos_token_id"]] + [sequence[1]] * prefix + block(proc) + sequence[-2:]
    assert batch["image_counts"].tolist() == [1 if block_fits else 0]
    assert ("pixel_values" in batch) == block_fits
    if not block_fits:
        assert special["image_start_token_id"] not in sequence and special["image_token_id"] not in sequence
        # Cut at the block's <soi> (if the block started inside the context), else at max_length - 1.
        assert len(sequence) == min(1 + prefix, 19) + 1


def test_truncation_drops_only_the_blocks_that_do_not_fit(tokenizer):
    proc = make_processor(tokenizer, max_length=20)
    batch = proc(documents=[document_of_length(proc, tokenizer, 1, num_images=3)])
    # <sot> one [block 6] two [block 6] two = 16 tokens, the third block would need 6 more.
    assert batch["image_counts"].tolist() == [2]
    assert [image_index(p) for p in batch["pixel_values"]] == [0, 1]
    sequence = real(batch, 0)
    assert len(sequence) == 17 and sequence[-1] == ids(proc)["eos_token_id"]


def test_very_long_document(tokenizer):
    proc = make_processor(tokenizer, max_length=64)
    long_text = "the cat sat on the mat. " * 20000  # ~480k characters
    batch = proc(documents=[[long_text, color_image(0)], [color_image(1), long_text, color_image(2)]])
    assert batch["input_ids"].shape == (2, 64)
    assert batch["image_counts"].tolist() == [0, 1]
    assert [image_index(p) for p in batch["pixel_values"]] == [1]


# ----------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------


def test_dynamic_padding_to_longest(proc):
    batch = proc(text=["a", "a photo of the cat on the beach"])
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert batch["input_ids"].shape[1] == max(lengths)
    assert batch["attention_mask"][0].tolist() == [1] * lengths[0] + [0] * (max(lengths) - lengths[0])
    assert (batch["input_ids"][0, lengths[0] :] == 0).all()


def test_pad_to_multiple_of_is_capped_at_max_length(tokenizer):
    proc = make_processor(tokenizer, max_length=30)
    assert proc(text=["a photo"], pad_to_multiple_of=8)["input_ids"].shape[1] == 8
    long = " ".join(["word"] * 26)
    assert proc(text=[long], pad_to_multiple_of=8)["input_ids"].shape[1] == 30  # not 32
    assert proc(text=["a"], padding="max_length")["input_ids"].shape[1] == 30
    unpadded = proc(text=["a", "a photo of"], padding=False, return_tensors=None)
    assert [len(row) for row in unpadded["input_ids"]] == [3, 5]
    with pytest.raises(ValueError, match="needs sequences of one length"):
        proc(text=["a", "a photo of"], padding=False)
    with pytest.raises(ValueError, match="documents is empty"):
        proc(documents=[])


def test_numpy_and_list_outputs(proc):
    as_numpy = proc(documents=[["a cat", color_image(0)]], return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray) and as_numpy["pixel_values"].shape == (1, 3, 16, 16)
    as_lists = proc(documents=[["a cat", color_image(0)]], return_tensors=None)
    assert isinstance(as_lists["input_ids"], list) and len(as_lists["pixel_values"]) == 1


# ----------------------------------------------------------------------------------------------
# Bad and odd input
# ----------------------------------------------------------------------------------------------


def test_marker_and_image_count_mismatch(proc):
    with pytest.raises(ValueError, match=r"2 image markers but 1 images"):
        proc(text=["a <image> b <image>"], images=[color_image(0)])
    with pytest.raises(ValueError, match=r"1 image markers but no images"):
        proc(text=["a <image> b"])
    with pytest.raises(ValueError, match=r"Text 1 holds 1 image markers but 0 images"):
        proc(text=["a <image>", "b <image>"], images=[[color_image(0)], []])
    with pytest.raises(ValueError, match=r"Got 3 images for 2 captions"):
        proc(images=[color_image(i) for i in range(3)], text=["a", "b"])


def test_unknown_segment_type(proc):
    with pytest.raises(TypeError, match=r"Document 0, segment 1: expected a str or an image .* got int"):
        proc(documents=[["text", 3]])
    with pytest.raises(TypeError, match="got dict"):
        proc(documents=[["text", {"image": None}]])
    with pytest.raises(TypeError):
        proc(text=[1, 2])


def test_invalid_settings(tokenizer):
    with pytest.raises(ValueError, match="num_image_tokens \\+ 4"):
        make_processor(tokenizer, num_image_tokens=10, max_length=12)
    with pytest.raises(ValueError, match="image_first_prob"):
        make_processor(tokenizer, image_first_prob=1.5)
    with pytest.raises(ValueError, match="lacks the LCL special tokens"):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        LCLProcessor(LCLImageProcessor(), PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())))


def test_empty_and_whitespace_text(proc):
    special = ids(proc)
    batch = proc(documents=[["", color_image(0), "   \n\t "], [" "]])
    assert real(batch, 0) == [special["bos_token_id"]] + block(proc) + [special["eos_token_id"]]
    assert real(batch, 1) == [special["bos_token_id"], special["eos_token_id"]]
    pair = proc(images=[color_image(0)], text=[""], image_first_prob=0.0)
    assert real(pair, 0) == [special["bos_token_id"]] + block(proc)


def test_document_text_cannot_forge_an_image_block(tokenizer):
    proc = make_processor(tokenizer, max_length=120)
    batch = proc(documents=[["<start_of_img> <img_placehold> <end_of_img> <end_of_text>", color_image(0)]])
    special = ids(proc)
    sequence = real(batch, 0)
    assert sequence.count(special["image_start_token_id"]) == 1
    assert sequence.count(special["eos_token_id"]) == 1


@pytest.mark.parametrize("size, mode", [((1, 1), "RGB"), ((10000, 10), "RGB"), ((10, 10000), "L"), ((7, 5), "RGBA"),
                                        ((30, 20), "P"), ((30, 20), "CMYK"), ((9, 9), "1")])  # fmt: skip
def test_odd_images(proc, size, mode):
    batch = proc(documents=[["text", color_image(2, size=size, mode=mode)]])
    assert batch["pixel_values"].shape == (1, 3, 16, 16) and torch.isfinite(batch["pixel_values"]).all()


# ----------------------------------------------------------------------------------------------
# Save / load and the contract with the model
# ----------------------------------------------------------------------------------------------


def test_save_and_auto_load(tokenizer, tmp_path):
    proc = make_processor(tokenizer, num_image_tokens=4, max_length=40, image_first_prob=0.25)
    proc.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LCLProcessor)
    assert (loaded.num_image_tokens, loaded.max_length, loaded.image_first_prob) == (4, 40, 0.25)
    assert loaded.special_token_ids() == proc.special_token_ids()
    document = [["the cat", color_image(1), "on the beach"]]
    for key, value in proc(documents=document).items():
        torch.testing.assert_close(loaded(documents=document)[key], value)


def test_processor_output_trains_the_model(proc, tokenizer):
    torch.manual_seed(0)
    config = LCLConfig(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=proc.max_length),
        projection_dim=32, pooler_num_attention_heads=2, **proc.special_token_ids(),
    )  # fmt: skip
    assert config.num_image_tokens == proc.num_image_tokens
    model = LCLForPreTraining(config)
    documents = proc(documents=[["the cat", color_image(0), "sat on the mat"], ["a dog", color_image(1)]])
    pairs = proc(
        images=[color_image(2), color_image(3)],
        text=["a red car", "a tree"],
        generator=torch.Generator().manual_seed(0),
    )
    for batch in (documents, pairs):
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        assert torch.isfinite(outputs.loss) and outputs.num_contrastive_pairs >= 1
        outputs.loss.backward()
    # Prompt and image batches feed the retrieval API directly, as CLIP's processor does.
    text_features = model.lcl.get_text_features(**proc(text=["a photo of a cat", "a dog"]))
    image_features = model.lcl.get_image_features(**proc(images=[color_image(0)]))
    assert text_features.shape == (2, 32) and image_features.shape == (1, 32)


# ----------------------------------------------------------------------------------------------
# Property-based: random documents always satisfy the invariants
# ----------------------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "a", "mat", "photo", "2024", "!", "naïve", "日本", "", " ", "\n"]
segment = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join),
    st.integers(min_value=0, max_value=20).map(lambda i: ("image", i)),
)


def expected_document(proc, tokenizer, segments) -> tuple[list[int], int]:
    """Independent statement of the rule: keep max_length - 1 tokens; if the last <soi> kept opens an
    incomplete block, cut there; end with <eot>."""
    special, n, limit = ids(proc), proc.num_image_tokens, proc.max_length
    tokens = [special["bos_token_id"]]
    for seg in segments:
        tokens += block(proc) if isinstance(seg, tuple) else text_ids(tokenizer, seg)
    tokens.append(special["eos_token_id"])
    if len(tokens) > limit:
        tokens = tokens[: limit - 1]
        starts = [i for i, token in enumerate(tokens) if token == special["image_start_token_id"]]
        if starts and starts[-1] + n + 1 > len(tokens) - 1:
            tokens = tokens[: starts[-1]]
        tokens.append(special["eos_token_id"])
    return tokens, tokens.count(special["image_start_token_id"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    documents=st.lists(st.lists(segment, min_size=0, max_size=8), min_size=1, max_size=4),
    num_image_tokens=st.integers(min_value=1, max_value=6),
    extra_length=st.integers(min_value=0, max_value=40),
    multiple=st.sampled_from([None, 1, 8]),
)
def test_random_documents_satisfy_the_invariants(tokenizer, documents, num_image_tokens, extra_length, multiple):
    proc = make_processor(tokenizer, num_image_tokens=num_image_tokens, max_length=num_image_tokens + 4 + extra_length)
    special = ids(proc)
    batch_documents = [[color_image(s[1]) if isinstance(s, tuple) else s for s in doc] for doc in documents]
    batch = proc(documents=batch_documents, pad_to_multiple_of=multiple)

    lengths = batch["attention_mask"].sum(-1)
    assert batch["input_ids"].shape[1] == max(
        int(lengths.max()), min(-(-int(lengths.max()) // (multiple or 1)) * (multiple or 1), proc.max_length)
    )
    assert batch["input_ids"].shape[1] <= proc.max_length
    expected_images = []
    for row, segments in enumerate(documents):
        sequence = real(batch, row)
        mask = batch["attention_mask"][row].tolist()
        assert mask == sorted(mask, reverse=True)  # ones then zeros
        expected, num_blocks = expected_document(proc, tokenizer, segments)
        assert sequence == expected
        # Every <soi> opens a whole block and their count equals the images returned for this row.
        starts = [i for i, token in enumerate(sequence) if token == special["image_start_token_id"]]
        for start in starts:
            assert sequence[start : start + num_image_tokens + 2] == block(proc)
        assert sequence.count(special["image_token_id"]) == num_image_tokens * len(starts)
        assert batch["image_counts"][row].item() == len(starts) == num_blocks
        expected_images += [s[1] for s in segments if isinstance(s, tuple)][: len(starts)]
    pixel_values = batch.get("pixel_values")
    returned = [image_index(p) for p in pixel_values] if pixel_values is not None else []
    assert returned == expected_images  # all kept images, in document order


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    captions=st.lists(st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join), min_size=1, max_size=5),
    image_first=st.booleans(),
    extra_length=st.integers(min_value=0, max_value=20),
)
def test_random_pairs_have_exact_layouts(tokenizer, captions, image_first, extra_length):
    proc = make_processor(tokenizer, max_length=N + 4 + extra_length)
    special = ids(proc)
    batch = proc(
        images=[color_image(i) for i in range(len(captions))], text=captions, image_first_prob=float(image_first)
    )
    for row, caption in enumerate(captions):
        caption_ids = text_ids(tokenizer, caption)[:extra_length]
        if image_first:
            expected = block(proc) + caption_ids + [special["eos_token_id"]]
        else:
            expected = [special["bos_token_id"]] + caption_ids + block(proc)
        assert real(batch, row) == expected
    assert [image_index(p) for p in batch["pixel_values"]] == list(range(len(captions)))
