"""LoRA on LCL with PEFT: default targets, Trainer, adapter save / reload / merge."""

import re

import pytest
import torch
from conftest import image_block, pad_batch
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modeling_lcl import LCLForPreTraining
from modeling_lcl.modeling_lcl_tasks import LCLForConditionalGeneration, LCLForImageClassification
from modeling_lcl.peft_lcl import lcl_lora_config, lora_target_modules


def lora_modules(model) -> set[str]:
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


def test_default_targets_are_the_attention_projections_of_both_towers(config):
    model = get_peft_model(LCLForPreTraining(config), lcl_lora_config())
    targets = lora_modules(model)
    layers = config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    assert len(targets) == 4 * layers
    assert all(re.search(r"(vision_model\.vit\.encoder|text_model)\.layers\.\d+\.self_attn\.(q|k|v|out)_proj$", t)
               for t in targets)
    # The attentive pooler has q/k/v projections too, but it is not a transformer block.
    assert not any("pooler" in t for t in targets)


def test_target_choices(config):
    vision_mlp = get_peft_model(LCLForPreTraining(config), lcl_lora_config(towers=["vision"], include_mlp=True))
    targets = lora_modules(vision_mlp)
    assert len(targets) == 6 * config.vision_config.num_hidden_layers
    assert all("vision_model" in t for t in targets) and any(t.endswith("mlp.fc2") for t in targets)
    with pytest.raises(ValueError, match="towers must be"):
        lora_target_modules(["audio"])


def test_classifier_defaults_train_lora_on_the_vit_and_the_whole_head(config):
    model = LCLForImageClassification(tiny_config_with_labels(config))
    peft_model = get_peft_model(model, lcl_lora_config(model))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier" in name for name in trainable)
    assert all("lora_" in name or "classifier" in name for name in trainable)
    assert all("vision_model" in t for t in lora_modules(peft_model))


def tiny_config_with_labels(config, num_labels=2):
    config = config.__class__.from_dict(config.to_dict())
    config.num_labels = num_labels
    return config


class CaptionDataset(Dataset):
    """Image-first and text-first pairs of a fixed toy vocabulary, one image each."""

    def __init__(self, config, size=8):
        block = image_block(config.num_image_tokens)
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(size):
            words = [5 + i % 4, 10 + i % 3]
            tokens = block + words + [config.eos_token_id] if i % 2 else [config.bos_token_id] + words + block
            self.items.append({"input_ids": tokens, "pixel_values": torch.randn(3, 16, 16, generator=generator)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(features):
    input_ids, attention_mask = pad_batch([f["input_ids"] for f in features])
    pixel_values = torch.stack([f["pixel_values"] for f in features])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def test_lora_round_trip_through_trainer_save_reload_and_merge(config, tmp_path):
    torch.manual_seed(0)
    LCLForPreTraining(config).save_pretrained(tmp_path / "base")
    base = LCLForPreTraining.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, lcl_lora_config(base, r=4, init_lora_weights="gaussian"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=CaptionDataset(config), data_collator=collate)
    trainer.train()
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    batch = collate([CaptionDataset(config)[i] for i in range(4)])
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(**batch, return_loss=False).logits
        base_only = LCLForPreTraining.from_pretrained(tmp_path / "base").eval()(**batch, return_loss=False).logits
        reloaded = PeftModel.from_pretrained(LCLForPreTraining.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        reloaded_logits = reloaded.eval()(**batch, return_loss=False).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(**batch, return_loss=False).logits
    assert isinstance(merged, LCLForPreTraining) and not lora_modules(merged)
    assert (trained - base_only).abs().max() > 1e-3  # training moved the adapter
    torch.testing.assert_close(reloaded_logits, trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_logits, reloaded_logits, rtol=0, atol=1e-5)


def test_lora_classifier_merges_with_its_trained_head(config, tmp_path):
    torch.manual_seed(0)
    model = LCLForImageClassification(tiny_config_with_labels(config))
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, lcl_lora_config(model, r=4, init_lora_weights="gaussian"))
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].bias.add_(1.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    pixel_values = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = peft_model.eval()(pixel_values=pixel_values).logits
        base = LCLForImageClassification.from_pretrained(tmp_path / "base")
        merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
        torch.testing.assert_close(merged(pixel_values=pixel_values).logits, expected, rtol=0, atol=1e-5)


def test_generate_runs_through_a_peft_model(config):
    torch.manual_seed(0)
    model = LCLForConditionalGeneration(config).eval()
    block = image_block(config.num_image_tokens)
    inputs = {"input_ids": torch.tensor([block + [5]]), "pixel_values": torch.randn(1, 3, 16, 16)}
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    expected = model.generate(**inputs, **kwargs)
    peft_model = get_peft_model(model, lcl_lora_config(model, init_lora_weights="gaussian"))
    out = peft_model.generate(**inputs, **kwargs)
    assert out.shape == expected.shape
    with peft_model.disable_adapter():
        assert torch.equal(peft_model.generate(**inputs, **kwargs), expected)
