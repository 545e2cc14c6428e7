"""LCLImageProcessor = the reference eval transform; odd sizes and modes; RandomResizedCrop."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from processing import LCLImageProcessor, RandomResizedCrop

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def reference_transform(image: PIL.Image.Image, size: int) -> np.ndarray:
    """OpenCLIP's eval transform on an image opened with `.convert("RGB")`, written with PIL/numpy:
    torchvision `Resize(size)` (shortest side, long side truncated), `CenterCrop(size)` (offsets rounded),
    `ToTensor`, `Normalize(CLIP mean, std)`."""
    image = image.convert("RGB")
    width, height = image.size
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    resized = image.resize((new_w, new_h), PIL.Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("height, width", [(48, 64), (64, 48), (31, 33), (33, 31), (50, 77), (32, 32), (1, 1), (5, 3)])
def test_matches_reference_eval_transform(height, width):
    processor = LCLImageProcessor(size=32, crop_size=32)
    image = random_image(height, width)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32) and pixel_values.dtype == torch.float32
    np.testing.assert_allclose(pixel_values[0].numpy(), reference_transform(image, 32), atol=1e-5)


def test_defaults_are_the_b16_transform():
    processor = LCLImageProcessor()
    image = random_image(240, 320)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(pixel_values[0].numpy(), reference_transform(image, 224), atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1", "LA", "I;16", "I", "F"])
def test_modes_convert_like_the_reference(mode):
    """Every mode is converted with PIL's convert("RGB") (alpha dropped, not composited on white)."""
    image = random_image(20, 30, mode)
    pixel_values = LCLImageProcessor(size=16, crop_size=16)(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 16)
    assert torch.isfinite(pixel_values).all()
    np.testing.assert_allclose(pixel_values[0].numpy(), reference_transform(image, 16), atol=1e-5)


def test_transparent_pixels_keep_their_color():
    image = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    pixel_values = LCLImageProcessor(size=8, crop_size=8)(image, return_tensors="pt")["pixel_values"]
    expected_black = torch.tensor(-CLIP_MEAN / CLIP_STD)
    torch.testing.assert_close(pixel_values[0, :, 0, 0], expected_black)


@pytest.mark.parametrize("height, width", [(10, 10000), (10000, 10), (1, 5000), (3000, 1)])
def test_elongated_images_are_cheap_and_close(height, width):
    """Beyond 64x the crop area the crop is resampled from its source region: same sampling positions,
    no giant intermediate image."""
    image = random_image(height, width)
    pixel_values = LCLImageProcessor(size=16, crop_size=16)(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 16)
    # Identical up to PIL's intermediate rounding (at most a few grey levels) for these shapes.
    difference = np.abs(pixel_values[0].numpy() - reference_transform(image, 16)) * CLIP_STD[:, None, None] * 255
    assert difference.mean() < 8


def test_numpy_and_torch_inputs():
    image = random_image(20, 30)
    processor = LCLImageProcessor(size=16, crop_size=16)
    from_pil = processor(image, return_tensors="pt")["pixel_values"]
    from_numpy = processor(np.asarray(image), return_tensors="pt")["pixel_values"]
    from_torch = processor(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), return_tensors="pt")[
        "pixel_values"
    ]
    assert torch.equal(from_numpy, from_pil)  # PIL inputs are resized in PIL, arrays via PIL: same pixels
    assert torch.equal(from_torch, from_pil)


def test_batch_keeps_order():
    images = [random_image(20, 30, seed=i) for i in range(3)]
    processor = LCLImageProcessor(size=16, crop_size=16)
    batch = processor(images, return_tensors="pt")["pixel_values"]
    for index, image in enumerate(images):
        torch.testing.assert_close(batch[index], processor(image, return_tensors="pt")["pixel_values"][0])


def test_save_and_auto_load(tmp_path):
    LCLImageProcessor(size=32, crop_size=32).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LCLImageProcessor)
    assert loaded.size.shortest_edge == 32 and loaded.crop_size.height == 32
    image = random_image(40, 50)
    torch.testing.assert_close(
        loaded(image, return_tensors="pt")["pixel_values"],
        LCLImageProcessor(size=32, crop_size=32)(image, return_tensors="pt")["pixel_values"],
    )


def test_random_resized_crop():
    image = random_image(60, 80)
    crop = RandomResizedCrop(16, scale=(0.9, 1.0), seed=0)
    out = crop(image)
    assert out.size == (16, 16) and out.mode == "RGB"
    # Reproducible with a seed; the region keeps 90-100% of the area within the allowed aspect ratios.
    boxes = [RandomResizedCrop(16, seed=3).crop_box(80, 60) for _ in range(2)]
    assert boxes[0] == boxes[1]
    for _ in range(50):
        left, top, right, bottom = crop.crop_box(80, 60)
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 60
        assert 0.85 * 4800 <= (right - left) * (bottom - top) <= 4800
    # Degenerate shapes fall back to a center crop of allowed ratio.
    assert RandomResizedCrop(16, seed=0)(random_image(1, 500)).size == (16, 16)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(16, scale=(0.0, 1.0))
