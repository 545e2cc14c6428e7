"""Shared tiny fixtures: a small LCL config with its own special ids and hand-built interleaved batches."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from modeling_lcl import LCLConfig  # noqa: E402

# Special ids of the tiny vocabulary (0 is padding and also an ordinary token, as in CLIP BPE).
IMG, SOI, EOI, SOT, EOT = 90, 91, 92, 93, 94


def tiny_config(**overrides) -> LCLConfig:
    kwargs = dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
        ),
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=48,
        ),
        projection_dim=32,
        pooler_num_attention_heads=4,
        image_token_id=IMG,
        image_start_token_id=SOI,
        image_end_token_id=EOI,
        bos_token_id=SOT,
        eos_token_id=EOT,
    )
    kwargs.update(overrides)
    return LCLConfig(**kwargs)


def image_block(num_image_tokens: int) -> list[int]:
    return [SOI] + [IMG] * num_image_tokens + [EOI]


def pad_batch(sequences: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with 0 to `length` (default: longest); returns `input_ids`, `attention_mask`."""
    length = length or max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def mixed_documents(num_image_tokens: int) -> tuple[list[list[int]], int]:
    """Two text-first samples, one image-first, one interleaved with two images; returns (sequences, num_images)."""
    block = image_block(num_image_tokens)
    sequences = [
        [SOT, 5, 6, 7] + block,  # text first: contrastive + text modelling
        [SOT, 8, 0, 9, 10] + block,  # text first, with the real token 0 inside
        block + [11, 12, 13, EOT],  # image first: captioning only
        [SOT, 14, 15] + block + [16, 17] + block + [18, EOT],  # interleaved document, two images
    ]
    return sequences, 5


@pytest.fixture
def config() -> LCLConfig:
    return tiny_config()


@pytest.fixture
def batch(config):
    torch.manual_seed(0)
    sequences, num_images = mixed_documents(config.num_image_tokens)
    input_ids, attention_mask = pad_batch(sequences)
    pixel_values = torch.randn(num_images, 3, 16, 16)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
