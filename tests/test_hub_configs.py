"""The folders of hub_configs/: loadable configs with the reference parameter counts, and model cards."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import modeling_lcl  # noqa: F401  (registers "lcl" with AutoConfig)
from modeling_lcl import LCLConfig, LCLForPreTraining
from modeling_lcl.convert_lcl import REFERENCE_VARIANTS, build_model_card, config_from_open_clip

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"

# Parameters of the reference architectures (OpenCLIP LCL models, lm_head included).
REFERENCE_COUNTS = {
    "lcl-vit-b-16-laion": 249_924_097,
    "lcl-vit-b-32-laion": 177_659_905,
    "lcl-vit-b-32-mmc4": 178_642_945,
}


def parameter_count(config: LCLConfig) -> int:
    with torch.device("meta"):
        model = LCLForPreTraining(config)
    return sum(p.numel() for p in model.parameters())


def test_every_variant_has_a_folder():
    folders = {path.name for path in HUB_CONFIGS.iterdir() if path.is_dir()}
    assert folders == set(REFERENCE_COUNTS) | {"lcl-tiny-demo"}


@pytest.mark.parametrize("name, count", sorted(REFERENCE_COUNTS.items()))
def test_reference_config_loads_and_has_the_reference_parameter_count(name, count):
    config = AutoConfig.from_pretrained(HUB_CONFIGS / name)
    assert isinstance(config, LCLConfig)
    assert parameter_count(config) == count
    # The folder states exactly what the converter builds from the reference model config.
    expected = config_from_open_clip(REFERENCE_VARIANTS[name].open_clip_config)
    assert json.loads(config.to_json_string()) == json.loads(expected.to_json_string())


def test_b32_variants_differ_only_in_the_text_position_table():
    laion = json.loads((HUB_CONFIGS / "lcl-vit-b-32-laion" / "config.json").read_text())
    mmc4 = json.loads((HUB_CONFIGS / "lcl-vit-b-32-mmc4" / "config.json").read_text())
    assert laion["text_config"].pop("max_position_embeddings") == 128
    assert mmc4["text_config"].pop("max_position_embeddings") == 2048
    assert laion == mmc4
    assert REFERENCE_COUNTS["lcl-vit-b-32-mmc4"] - REFERENCE_COUNTS["lcl-vit-b-32-laion"] == (2048 - 128) * 512


def test_tiny_demo_config_builds_a_small_model():
    config = AutoConfig.from_pretrained(HUB_CONFIGS / "lcl-tiny-demo")
    assert config.num_image_tokens == 16
    model = LCLForPreTraining(config)
    with torch.no_grad():
        latents = model.lcl.get_image_features(torch.randn(2, 3, 16, 16))
    assert latents.shape == (2, config.projection_dim)


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS) + ["lcl-tiny-demo", None])
def test_model_card_templates_render_with_metadata(name):
    folder = HUB_CONFIGS / name if name else HUB_CONFIGS
    config = AutoConfig.from_pretrained(HUB_CONFIGS / (name or "lcl-tiny-demo"))
    variant = REFERENCE_VARIANTS.get(name)
    card = build_model_card(
        config,
        folder / "model_card_template.md",
        variant,
        license=None if variant else "apache-2.0",
        source_checkpoint="epoch_32.pt",
        source_sha256="0" * 64,
        verification={"image_latents": 3.1e-6},
        results={"zero-shot accuracy": 0.5},
    )
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert {"lcl", "vision", "image-feature-extraction"} <= set(data["tags"])
    assert data["license"] == ("mit" if variant else "apache-2.0")
    if variant:
        assert data["datasets"] == list(variant.datasets)
        assert "epoch_32.pt" in card.text and "3.10e-06" in card.text
    assert f"{config.num_image_tokens} image tokens" in card.text
    assert "{{" not in card.text and "{%" not in card.text
