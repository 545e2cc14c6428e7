"""Export of the LCL vision tower as a plain CLIPVisionModel (modeling_lcl/export_lcl.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, CLIPImageProcessorPil, CLIPVisionModel

from modeling_lcl import LCLConfig, LCLForPreTraining
from modeling_lcl.export_lcl import export_vision_tower


def small_config() -> LCLConfig:
    return LCLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        projection_dim=32, pooler_num_attention_heads=4,
        image_token_id=95, image_start_token_id=96, image_end_token_id=97, bos_token_id=98, eos_token_id=99,
    )


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = LCLForPreTraining(small_config()).eval()
    with torch.no_grad():  # LayerNorms away from identity, so post_layernorm matters in the comparison
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return model


def test_exported_tower_loads_as_clip_vision_model_with_our_patch_features(model, tmp_path):
    out = export_vision_tower(model, tmp_path / "vit")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
    # The transformers 4.x / Hub CLIP key layout, which transformers 5 loads too.
    with safe_open(out / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert all(key.startswith("vision_model.") for key in keys)
    clip, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    clip.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert sum(p.numel() for p in clip.parameters()) == sum(p.numel() for p in model.lcl.vision_model.vit.parameters())

    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours = model.lcl.vision_model(pixels, output_hidden_states=True)
        theirs = clip(pixels, output_hidden_states=True)
    # CLIP's last_hidden_state precedes post_layernorm; ours has ln_post on every token.
    torch.testing.assert_close(clip.post_layernorm(theirs.last_hidden_state), ours.last_hidden_state,
                               rtol=0, atol=1e-6)
    assert not torch.allclose(theirs.last_hidden_state, ours.last_hidden_state, atol=1e-2)
    for mine, exported in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(exported, mine, rtol=0, atol=1e-6)
    # The patch tokens are what LCL's pooling block reads.
    torch.testing.assert_close(clip.post_layernorm(theirs.last_hidden_state)[:, 1:],
                               ours.last_hidden_state[:, 1:], rtol=0, atol=1e-6)


def test_exported_image_processor_is_the_reference_eval_transform(model, tmp_path):
    out = export_vision_tower(model, tmp_path / "vit")
    processor = AutoImageProcessor.from_pretrained(out)
    settings = processor.to_dict()
    assert settings["image_processor_type"] == "CLIPImageProcessor"
    assert settings["size"] == {"shortest_edge": 16} and settings["crop_size"] == {"height": 16, "width": 16}
    assert int(settings["resample"]) == 3  # bicubic
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    assert processor(images=[image], return_tensors="pt").pixel_values.shape == (1, 3, 16, 16)


def test_export_carries_over_a_given_image_processor(model, tmp_path):
    from processing import LCLImageProcessor

    custom = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    out = export_vision_tower(model, tmp_path / "vit", image_processor=custom)
    assert list(AutoImageProcessor.from_pretrained(out).image_mean) == [0.5, 0.5, 0.5]

    lcl_processor = LCLImageProcessor(size=16, crop_size=16)
    out = export_vision_tower(model, tmp_path / "vit-lcl", image_processor=lcl_processor)
    exported = AutoImageProcessor.from_pretrained(out).to_dict()
    assert exported["image_processor_type"] == "CLIPImageProcessor"
    for key in ("size", "crop_size", "image_mean", "image_std", "resample"):
        assert exported[key] == lcl_processor.to_dict()[key], key
    with pytest.raises(TypeError, match="image processor"):
        export_vision_tower(model, tmp_path / "bad", image_processor="clip")


def test_export_from_a_saved_folder_and_refusals(model, tmp_path):
    model.save_pretrained(tmp_path / "lcl")
    out = export_vision_tower(tmp_path / "lcl", tmp_path / "vit")
    clip = CLIPVisionModel.from_pretrained(out)
    torch.testing.assert_close(clip.embeddings.patch_embedding.weight,
                               model.lcl.vision_model.vit.embeddings.patch_embedding.weight)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_vision_tower(model, out)
    with pytest.raises(TypeError, match="Expected an LCL model"):
        export_vision_tower(clip, tmp_path / "other")
    assert not (tmp_path / "other").exists()
