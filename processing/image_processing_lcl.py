"""Image processor of LCL: the reference evaluation transform, PIL-backed (no torchvision).

Reference (OpenCLIP `image_transform(is_train=False)`, and the MMC4 / pair loaders that open every image
with `.convert("RGB")`): RGB conversion, resize of the shortest side with bicubic filtering, center crop,
`ToTensor` (/255), normalisation with the OpenAI CLIP mean and std. Two details differ from
transformers' `CLIPImageProcessor` and are kept as the reference has them:

- RGB conversion drops an alpha channel (PIL `convert("RGB")`); transformers composites on white.
- The center crop offset is `round((size - crop) / 2)` (torchvision), not `(size - crop) // 2`.

Training used `RandomResizedCrop(scale=(0.9, 1.0))` instead of resize + center crop; `RandomResizedCrop`
below does the same on PIL images and can be passed to `LCLDataCollator(image_transform=...)`.
"""

import math
import random

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling, SizeDict

# A shortest-side resize of a very elongated image (say 10 x 100000) would allocate the whole resized
# image (224 x 2,240,000 x 3 bytes) to keep 224 x 224 of it. Beyond this many resized pixels per output
# pixel, the crop is resampled straight from its source region instead (same sampling positions; pixel
# values may differ from the full resize by PIL's intermediate rounding).
MAX_RESIZE_TO_CROP_RATIO = 64


class LCLImageProcessor(PilBackend):
    r"""
    Resize (shortest side, bicubic), center crop, rescale to [0, 1], normalise with the CLIP mean/std.

    Args:
        size (`int` or `dict`, *optional*, defaults to `{"shortest_edge": 224}`):
            Target of the shortest side (an `int` means `{"shortest_edge": size}`).
        crop_size (`int` or `dict`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Output size; must match the model's `vision_config.image_size`.
        Other arguments as in transformers' image processors (`do_resize`, `resample`, `do_center_crop`,
        `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, `do_convert_rgb`).

    Returns `pixel_values` of shape `(num_images, 3, crop_height, crop_width)`.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def convert_to_rgb(self, image, input_data_format=None) -> np.ndarray:
        """PIL images: `convert("RGB")` as the reference (alpha dropped, palettes and CMYK mapped); arrays as
        transformers does."""
        if isinstance(image, PIL.Image.Image):
            return np.asarray(_rgb(image))
        return super().convert_to_rgb(image, input_data_format=input_data_format)

    def process_image(self, image, do_convert_rgb: bool | None = None, input_data_format=None, **kwargs):
        """PIL images stay PIL images (converted to RGB): `_preprocess` resizes and crops them in PIL and makes
        one array of the crop, instead of converting the whole image to an array and back."""
        if isinstance(image, PIL.Image.Image) and do_convert_rgb:
            return _rgb(image)
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs)

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        """Crop `(C, H, W)` to `size` around the center with torchvision's rounding; pad with 0 if smaller."""
        crop_h, crop_w = size.height, size.width
        _, height, width = image.shape
        if crop_h > height or crop_w > width:
            pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
            image = np.pad(image, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)))
            _, height, width = image.shape
        top = int(round((height - crop_h) / 2.0))
        left = int(round((width - crop_w) / 2.0))
        return image[:, top : top + crop_h, left : left + crop_w]

    def _resize_and_center_crop_pil(self, image: PIL.Image.Image, shortest_edge: int, crop_size, resample):
        """The RGB `image` resized and cropped in PIL, as a `(C, H, W)` uint8 view; the same pixels as the
        array path."""
        width, height = image.size
        new_h, new_w = _resized_shape(height, width, shortest_edge)
        crop_h, crop_w = crop_size.height, crop_size.width
        if crop_h <= new_h and crop_w <= new_w and new_h * new_w <= MAX_RESIZE_TO_CROP_RATIO * crop_h * crop_w:
            top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
            resized = image.resize((new_w, new_h), resample=resample)
            return np.moveaxis(np.asarray(resized.crop((left, top, left + crop_w, top + crop_h))), -1, 0)
        # Padding or an elongated image: the array path handles those.
        return self._resize_and_center_crop(_channels_first(image), shortest_edge, crop_size, resample)

    def _resize_and_center_crop(self, image: np.ndarray, shortest_edge: int, crop_size, resample) -> np.ndarray:
        _, height, width = image.shape
        new_h, new_w = _resized_shape(height, width, shortest_edge)
        crop_h, crop_w = crop_size.height, crop_size.width
        fits = crop_h <= new_h and crop_w <= new_w
        if not fits or new_h * new_w <= MAX_RESIZE_TO_CROP_RATIO * crop_h * crop_w:
            if fits and image.dtype == np.uint8 and image.shape[0] == 3:
                # RGB bytes: what `self.resize` does for them (PIL resize), minus its conversions and copies.
                pil_image = PIL.Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
                resized = np.asarray(pil_image.resize((new_w, new_h), resample=resample))
                return self.center_crop(np.moveaxis(resized, -1, 0), crop_size)
            resized = self.resize(image, size=SizeDict(height=new_h, width=new_w), resample=resample)
            return self.center_crop(resized, crop_size)
        # Elongated image: resample only the source region that the crop covers.
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        scale_y, scale_x = height / new_h, width / new_w
        box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
        pil_image = to_pil_image(image, input_data_format=ChannelDimension.FIRST)
        cropped = np.asarray(pil_image.resize((crop_w, crop_h), resample=resample, box=box))
        return cropped[None] if cropped.ndim == 2 else np.moveaxis(cropped, -1, 0)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size,
        resample,
        do_center_crop: bool,
        crop_size,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_pad: bool | None = None,
        pad_size=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        processed = []
        for image in images:
            if do_resize and do_center_crop and size.shortest_edge:
                if isinstance(image, PIL.Image.Image):
                    image = self._resize_and_center_crop_pil(image, size.shortest_edge, crop_size, resample)
                else:
                    image = self._resize_and_center_crop(image, size.shortest_edge, crop_size, resample)
            else:
                if isinstance(image, PIL.Image.Image):
                    image = _channels_first(image)
                if do_resize:
                    image = self.resize(image=image, size=size, resample=resample)
                if do_center_crop:
                    image = self.center_crop(image, crop_size)
            if do_rescale and do_normalize:
                image = _rescale_and_normalize(image, rescale_factor, image_mean, image_std)
            elif do_rescale:
                image = self.rescale(image, rescale_factor)
            elif do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(np.ascontiguousarray(image, dtype=np.float32))
        if do_pad:
            processed = self.pad(processed, pad_size=pad_size)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


def _rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The reference's `convert("RGB")`: alpha dropped (not composited), palettes and CMYK mapped."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """torchvision's `Resize(shortest_edge)`: the long side is truncated, not rounded."""
    if height <= width:
        return shortest_edge, int(shortest_edge * width / height)
    return int(shortest_edge * height / width), shortest_edge


def _channels_first(image: PIL.Image.Image) -> np.ndarray:
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def _rescale_and_normalize(image: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """`(image * scale - mean) / std` per channel of `(C, H, W)`, in float32 (the two separate float64 steps of
    transformers cost more than the resize here). Returns a new contiguous `(C, H, W)` float32 array."""
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    if image.shape[0] != mean.shape[0]:
        raise ValueError(f"image has {image.shape[0]} channels but image_mean has {mean.shape[0]} values.")
    factor, offset = np.float32(scale) / std, mean / std
    if image.dtype == np.uint8:
        # Put the 256 possible values of each channel through the same float32 operations, then look the
        # pixels up: bit-identical to the arithmetic below, and it reads a strided (H, W, C) view directly.
        table = np.arange(256, dtype=np.float32)[None, :] * factor[:, :, 0]
        table -= offset[:, :, 0]
        out = np.empty(image.shape, dtype=np.float32)
        for channel in range(image.shape[0]):
            np.take(table[channel], image[channel], out=out[channel])
        return out
    out = image.astype(np.float32)
    out *= factor
    out -= offset
    return out


class RandomResizedCrop:
    """Training-time augmentation of the reference: crop a random region of `scale` of the area and
    aspect ratio in `ratio` (log-uniform), resize it to `size` x `size` with bicubic filtering.

    Same algorithm as torchvision's `RandomResizedCrop` (10 tries, then a center crop of clamped ratio),
    on PIL images. Use it as `LCLDataCollator(image_transform=RandomResizedCrop(224, seed=0))`; the image
    processor's resize/crop then leave the `size` x `size` result unchanged.
    """

    def __init__(self, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), seed: int | None = None):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}.")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}.")
        self.size, self.scale, self.ratio = size, scale, ratio
        self.rng = random.Random(seed)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """`(left, top, right, bottom)` of the region to keep."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = self.rng.randint(0, height - h)
                left = self.rng.randint(0, width - w)
                return left, top, left + w, top + h
        # Fallback: the whole image, cropped to the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        box = self.crop_box(*image.size)
        return image.resize((self.size, self.size), resample=PIL.Image.BICUBIC, box=box)


__all__ = ["LCLImageProcessor", "RandomResizedCrop"]
