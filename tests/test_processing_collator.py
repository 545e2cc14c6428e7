"""LCLDataCollator: the processor's code path for Trainer batches, seeding, skips."""

import PIL.Image
import pytest
import torch

from processing import LCLDataCollator, LCLImageProcessor, LCLProcessor, RandomResizedCrop, build_test_tokenizer

N = 4


@pytest.fixture(scope="module")
def proc():
    return LCLProcessor(
        LCLImageProcessor(size=16, crop_size=16), build_test_tokenizer(), num_image_tokens=N, max_length=24
    )


def image(index: int = 0) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (20, 12), (10 * index + 5, 0, 0))


def image_index(pixel_values: torch.Tensor) -> int:
    red = pixel_values[0, 0, 0].item() * 0.26862954 + 0.48145466
    return round((red * 255 - 5) / 10)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def test_mixed_batch_matches_the_processor(proc):
    examples = [
        {"image": image(1), "text": "a red car"},
        {"segments": ["the cat", image(2), "sat", image(3)]},
        {"text": "a prompt"},
    ]
    batch = LCLDataCollator(proc, image_first_prob=0.0)(examples)
    direct_pair = proc(images=[image(1)], text=["a red car"], image_first_prob=0.0)
    direct_doc = proc(documents=[["the cat", image(2), "sat", image(3)]])
    direct_prompt = proc(text=["a prompt"])
    for row, direct in enumerate([direct_pair, direct_doc, direct_prompt]):
        length = direct["input_ids"].shape[1]
        torch.testing.assert_close(batch["input_ids"][row, :length], direct["input_ids"][0])
        assert batch["attention_mask"][row].sum() == length
    assert batch["image_counts"].tolist() == [1, 2, 0]
    assert [image_index(p) for p in batch["pixel_values"]] == [1, 2, 3]


def test_seeded_draws_are_reproducible(proc):
    soi = proc.special_token_ids()["image_start_token_id"]
    examples = [{"image": image(), "text": "a cat"} for _ in range(64)]

    def pattern(collator):
        return (collator(examples)["input_ids"][:, 0] == soi).tolist()

    assert pattern(LCLDataCollator(proc, seed=3)) == pattern(LCLDataCollator(proc, seed=3))
    assert pattern(LCLDataCollator(proc, seed=3)) != pattern(LCLDataCollator(proc, seed=4))
    collator = LCLDataCollator(proc, seed=3)
    assert pattern(collator) != pattern(collator)  # the generator advances between batches
    assert not any(pattern(LCLDataCollator(proc, image_first_prob=0.0, seed=3)))


def test_an_example_can_fix_its_own_layout(proc):
    """`image_first` in an example overrides the draw, and only the other pairs consume random draws."""
    soi = proc.special_token_ids()["image_start_token_id"]
    fixed = [{"image": image(), "text": "a cat", "image_first": i % 3 == 0} for i in range(12)]
    free = [{"image": image(), "text": "a cat"} for _ in range(12)]
    starts = (LCLDataCollator(proc, image_first_prob=0.5, seed=0)(fixed + free)["input_ids"][:, 0] == soi).tolist()
    assert starts[:12] == [i % 3 == 0 for i in range(12)]
    alone = (LCLDataCollator(proc, image_first_prob=0.5, seed=0)(free)["input_ids"][:, 0] == soi).tolist()
    assert starts[12:] == alone
    always_text_first = LCLDataCollator(proc, image_first_prob=0.0)(fixed)["input_ids"][:, 0] == soi
    assert always_text_first.tolist() == [i % 3 == 0 for i in range(12)]
    with pytest.raises(TypeError, match="image_first"):
        LCLDataCollator(proc)([{"image": image(), "text": "a cat", "image_first": "yes"}])


def test_dataloader_workers_draw_differently(proc):
    """Each worker seeds from its own (per-epoch) seed: workers do not repeat each other's layouts."""
    soi = proc.special_token_ids()["image_start_token_id"]
    dataset = ListDataset([{"image": image(), "text": "a cat"} for _ in range(64)])

    def patterns():
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=32, num_workers=2, collate_fn=LCLDataCollator(proc, seed=1)
        )
        return [tuple((batch["input_ids"][:, 0] == soi).tolist()) for batch in loader]

    first = patterns()
    assert len(first) == 2 and first[0] != first[1]
    assert patterns() == first  # reproducible from torch's seed


def test_skipped_examples_are_dropped_and_counted(proc):
    collator = LCLDataCollator(proc)
    batch = collator([{"segments": None}, {"image": None, "text": "x"}, {"segments": ["a cat", image()]}])
    assert batch["input_ids"].shape[0] == 1
    assert collator.stats["skipped_examples"] == 2
    with pytest.raises(ValueError, match="All 1 examples of the batch were skipped"):
        collator([{"segments": None}])
    with pytest.raises(ValueError, match="expected 'segments'"):
        collator([{"pixels": image()}])


def test_documents_left_without_images_are_dropped(proc):
    collator = LCLDataCollator(proc)
    long_text = " ".join(["word"] * 40)
    lost = {"segments": [long_text, image(1)]}  # the block is past max_length
    kept = {"segments": ["a cat", image(2)]}
    text_only = {"segments": ["no images at all"]}
    batch = collator([lost, kept, text_only])
    assert batch["input_ids"].shape[0] == 2 and batch["image_counts"].tolist() == [1, 0]
    assert [image_index(p) for p in batch["pixel_values"]] == [2]
    assert collator.stats["documents_without_images"] == 1
    # A batch made only of such documents is kept (text only) rather than emptied.
    batch = collator([lost])
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch
    keep_all = LCLDataCollator(proc, drop_documents_without_images=False)
    assert keep_all([lost, kept])["input_ids"].shape[0] == 2


def test_image_transform_and_options(proc):
    collator = LCLDataCollator(proc, image_transform=RandomResizedCrop(16, seed=0), pad_to_multiple_of=8,
                               return_image_counts=False)  # fmt: skip
    batch = collator([{"image": PIL.Image.new("RGB", (40, 30), "red"), "text": "a red square"}])
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert batch["input_ids"].shape[1] % 8 == 0 or batch["input_ids"].shape[1] == proc.max_length
    assert "image_counts" not in batch


def test_feeds_transformers_trainer(proc, tmp_path):
    from transformers import Trainer, TrainingArguments

    from modeling_lcl import LCLConfig, LCLForPreTraining

    config = LCLConfig(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        text_config=dict(vocab_size=len(proc.tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=proc.max_length),
        projection_dim=32, pooler_num_attention_heads=2, **proc.special_token_ids(),
    )  # fmt: skip
    examples = [{"image": image(i), "text": "a red car"} for i in range(4)]
    examples += [{"segments": ["the cat", image(i), "sat"]} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, remove_unused_columns=False,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(model=LCLForPreTraining(config), args=args, train_dataset=ListDataset(examples),
                      data_collator=LCLDataCollator(proc, seed=0))  # fmt: skip
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
