"""Conversion of OpenCLIP-format LCL checkpoints (modeling_lcl/convert_lcl.py, examples/convert_lcl_checkpoint.py).

The checks run against an independent re-implementation of the reference forward written here, in
plain tensor math on the reference key names of DESIGN.md section 2 (no torch attention or LayerNorm
ops, no code shared with the package), on random reference-layout state dicts built here too.
"""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

import modeling_lcl  # noqa: F401  (registers the Auto classes)
from modeling_lcl import LCLForPreTraining, LCLModel
from modeling_lcl.convert_lcl import (
    REFERENCE_VARIANTS,
    CheckpointMismatchError,
    check_verification,
    config_from_open_clip,
    convert_checkpoint,
    convert_state_dict,
    load_open_clip_state_dict,
    resolve_model_config,
    verify_conversion,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_lcl_checkpoint = load_script("convert_lcl_checkpoint")

TOL = 1e-4

# ---------------------------------------------------------------------------------------------
# A reference architecture and a random state dict in its exact layout
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    """The numbers of a reference LCL architecture (OpenCLIP names)."""

    image_size: int = 16
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    head_width: int = 16
    text_width: int = 24
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = 24
    vocab_size: int = 64
    pool_heads: int = 4
    # <sot>, <eot>, <img>, <soi>, <eoi>
    special_ids: tuple = (59, 60, 61, 62, 63)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def open_clip_config(self) -> dict:
        names = ("<start_of_text>", "<end_of_text>", "<img_placehold>", "<start_of_img>", "<end_of_img>")
        return {
            "embed_dim": self.text_width,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                           "patch_size": self.patch_size, "head_width": self.head_width},
            "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers},
            "pool_project_cfg": {"pool_proj_type": "attn", "input_dim": self.vision_width,
                                 "output_dim": self.text_width, "attn_num_heads": self.pool_heads},
            "special_token_ids": dict(zip(names, self.special_ids, strict=True)),
            "custom_text": True,
        }


TINY = Arch()
# The published B/16 LAION and the B/32 LAION layouts, with one block per tower for CI speed.
B16_ONE_LAYER = Arch(224, 16, 768, 1, 64, 768, 12, 1, 280, 49411, 12, (49406, 49407, 49408, 49409, 49410))
B32_ONE_LAYER = Arch(224, 32, 768, 1, 64, 512, 8, 1, 128, 49411, 8, (49406, 49407, 49408, 49409, 49410))
B16_FULL = dataclasses.replace(B16_ONE_LAYER, vision_layers=12, text_layers=12)


def reference_state_dict(arch: Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the exact reference key names and shapes (DESIGN.md section 2).

    Weights are scaled so attention is far from uniform and LayerNorms are far from identity: a swapped
    q/k, a missing transpose or a wrong LayerNorm shows up as a large difference.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def rand(name, *shape, std):
        sd[name] = torch.randn(*shape, generator=gen) * std

    def layer_norm(name, width):
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(width, generator=gen)
        sd[f"{name}.bias"] = 0.2 * torch.randn(width, generator=gen)

    def block(prefix, width):
        layer_norm(f"{prefix}.ln_1", width)
        rand(f"{prefix}.attn.in_proj_weight", 3 * width, width, std=width**-0.5)
        rand(f"{prefix}.attn.in_proj_bias", 3 * width, std=0.1)
        rand(f"{prefix}.attn.out_proj.weight", width, width, std=width**-0.5)
        rand(f"{prefix}.attn.out_proj.bias", width, std=0.1)
        layer_norm(f"{prefix}.ln_2", width)
        rand(f"{prefix}.mlp.c_fc.weight", 4 * width, width, std=width**-0.5)
        rand(f"{prefix}.mlp.c_fc.bias", 4 * width, std=0.1)
        rand(f"{prefix}.mlp.c_proj.weight", width, 4 * width, std=(4 * width) ** -0.5)
        rand(f"{prefix}.mlp.c_proj.bias", width, std=0.1)

    vw, tw, p = arch.vision_width, arch.text_width, arch.patch_size
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    rand("visual.conv1.weight", vw, 3, p, p, std=(3 * p * p) ** -0.5)
    rand("visual.class_embedding", vw, std=vw**-0.5)
    rand("visual.positional_embedding", arch.num_patches + 1, vw, std=0.1)
    layer_norm("visual.ln_pre", vw)
    for i in range(arch.vision_layers):
        block(f"visual.transformer.resblocks.{i}", vw)
    layer_norm("visual.ln_post", vw)
    rand("text.token_embedding.weight", arch.vocab_size, tw, std=0.5)
    rand("text.positional_embedding", arch.context_length, tw, std=0.1)
    for i in range(arch.text_layers):
        block(f"text.transformer.resblocks.{i}", tw)
    layer_norm("text.ln_final", tw)
    rand("text.text_projection", tw, tw, std=tw**-0.5)  # used as x @ P
    rand("pool_project.query_token", 1, 1, vw, std=1.0)
    for name in "qkv":
        layer_norm(f"pool_project.pooler.norm1_{name}", vw)
        rand(f"pool_project.pooler.cross_attn.{name}.weight", tw, vw, std=vw**-0.5)
        rand(f"pool_project.pooler.cross_attn.{name}_bias", tw, std=0.1)
    rand("pool_project.pooler.cross_attn.proj.weight", tw, tw, std=tw**-0.5)
    layer_norm("lm_head.0", tw)
    rand("lm_head.1.weight", arch.vocab_size, tw, std=tw**-0.5)
    return sd


# ---------------------------------------------------------------------------------------------
# Independent re-implementation of the reference forward (DESIGN.md section 1), plain tensor math
# ---------------------------------------------------------------------------------------------


def ln(sd, name, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def multi_head(q, k, v, heads, causal=False):
    """q `(B, Lq, D)`, k/v `(B, Lk, D)` -> `(B, Lq, D)`, softmax(q k^T / sqrt(head_dim)) v per head."""
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, -1, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(lq, lq).triu(1).bool(), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(0, 2, 1, 3).reshape(b, lq, d)


def resblock(sd, prefix, x, heads, causal):
    d = x.shape[-1]
    h = ln(sd, f"{prefix}.ln_1", x)
    w, bias = sd[f"{prefix}.attn.in_proj_weight"], sd[f"{prefix}.attn.in_proj_bias"]
    q, k, v = (h @ w[i * d:(i + 1) * d].T + bias[i * d:(i + 1) * d] for i in range(3))
    attn = multi_head(q, k, v, heads, causal)
    x = x + attn @ sd[f"{prefix}.attn.out_proj.weight"].T + sd[f"{prefix}.attn.out_proj.bias"]
    h = ln(sd, f"{prefix}.ln_2", x)
    h = gelu(h @ sd[f"{prefix}.mlp.c_fc.weight"].T + sd[f"{prefix}.mlp.c_fc.bias"])
    return x + h @ sd[f"{prefix}.mlp.c_proj.weight"].T + sd[f"{prefix}.mlp.c_proj.bias"]


def independent_image(sd, arch, pixels):
    """pixels `(n, 3, H, W)` -> pooled latents `(n, D)`, image-token embeddings `(n, N, D)`."""
    p = arch.patch_size
    patches = torch.nn.functional.unfold(pixels, kernel_size=p, stride=p).transpose(1, 2)  # (n, N, 3*p*p)
    x = patches @ sd["visual.conv1.weight"].reshape(arch.vision_width, -1).T
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = ln(sd, "visual.ln_pre", x)
    for i in range(arch.vision_layers):
        x = resblock(sd, f"visual.transformer.resblocks.{i}", x, arch.vision_width // arch.head_width, causal=False)
    x = ln(sd, "visual.ln_post", x)[:, 1:]
    pool = "pool_project.pooler"
    proj = lambda name, t: t @ sd[f"{pool}.cross_attn.{name}.weight"].T + sd[f"{pool}.cross_attn.{name}_bias"]  # noqa: E731
    query = proj("q", ln(sd, f"{pool}.norm1_q", sd["pool_project.query_token"])).expand(x.shape[0], 1, -1)
    keys = proj("k", ln(sd, f"{pool}.norm1_k", x))
    values = proj("v", ln(sd, f"{pool}.norm1_v", x))
    out = sd[f"{pool}.cross_attn.proj.weight"]
    pooled = multi_head(query, keys, values, arch.pool_heads)[:, 0] @ out.T
    return pooled, values @ out.T


def independent_text(sd, arch, embeds):
    x = embeds + sd["text.positional_embedding"][: embeds.shape[1]]
    for i in range(arch.text_layers):
        x = resblock(sd, f"text.transformer.resblocks.{i}", x, arch.text_heads, causal=True)
    return x


def independent_forward(sd, arch, input_ids, attention_mask, pixels):
    """Everything the converted model must reproduce, computed the reference way from `sd`."""
    img, soi, eoi = arch.special_ids[2], arch.special_ids[3], arch.special_ids[4]
    pooled, tokens = independent_image(sd, arch, pixels)
    embeds = sd["text.token_embedding.weight"][input_ids]
    embeds[input_ids == img] = tokens.reshape(-1, arch.text_width)
    hidden = independent_text(sd, arch, embeds)
    logits = ln(sd, "lm_head.0", hidden) @ sd["lm_head.1.weight"].T

    real = attention_mask.bool()
    targets = input_ids[:, 1:]
    supervised = real[:, 1:] & real[:, :-1] & (targets != img) & (targets != eoi)
    loss_gen = torch.nn.functional.cross_entropy(logits[:, :-1][supervised], targets[supervised])

    is_soi = (input_ids == soi) & real
    paired = is_soi & (attention_mask.cumsum(-1) > 1)  # not the first token of its sequence
    text = ln(sd, "text.ln_final", hidden[paired]) @ sd["text.text_projection"]
    text = text / text.norm(dim=-1, keepdim=True)
    image = pooled[paired[is_soi]]
    image = image / image.norm(dim=-1, keepdim=True)
    sim = sd["logit_scale"].exp() * image @ text.T
    labels = torch.arange(sim.shape[0])
    ce = torch.nn.functional.cross_entropy
    loss_con = (ce(sim, labels) + ce(sim.T, labels)) / 2
    return {"pooled": pooled, "tokens": tokens, "logits": logits, "text_embeds": text, "image_embeds": image,
            "loss_generation": loss_gen, "loss_contrastive": loss_con, "loss": loss_gen + 0.1 * loss_con}


def independent_zero_shot(sd, arch, prompt_ids, prompt_mask):
    """`<sot> prompt <eot>` with `<eot>` read as `<soi>`: the projected output there, per prompt."""
    eot, soi = arch.special_ids[1], arch.special_ids[3]
    ids = torch.where(prompt_ids == eot, soi, prompt_ids)
    hidden = independent_text(sd, arch, sd["text.token_embedding.weight"][ids])
    at_soi = hidden[(ids == soi) & prompt_mask.bool()]
    return ln(sd, "text.ln_final", at_soi) @ sd["text.text_projection"]


def documents(arch, seed=0):
    """Two text-first documents, one image-first, a real token 0 in the text, right padding."""
    gen = torch.Generator().manual_seed(seed)
    sot, eot, img, soi, eoi = arch.special_ids
    words = lambda n: torch.randint(1, min(arch.special_ids), (n,), generator=gen).tolist()  # noqa: E731
    block = [soi] + [img] * arch.num_patches + [eoi]
    rows = [[sot] + words(3) + [0] + block + words(2) + [eot], [sot] + words(2) + block, block + words(4) + [eot]]
    length = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    pixels = torch.randn(3, 3, arch.image_size, arch.image_size, generator=gen)
    prompts = [[sot] + words(4) + [eot], [sot] + words(2) + [eot, 0, 0]]
    prompt_ids = torch.tensor(prompts)
    prompt_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    return input_ids, attention_mask, pixels, prompt_ids, prompt_mask


def max_diff(a, b):
    return float((a - b).abs().max())


def check_against_independent(model: LCLForPreTraining, sd, arch):
    input_ids, attention_mask, pixels, prompt_ids, prompt_mask = documents(arch)
    expected = independent_forward(sd, arch, input_ids, attention_mask, pixels)
    with torch.no_grad():
        vision = model.lcl.vision_model(pixels)
        out = model(input_ids, attention_mask, pixels, output_logits=True)
        zero_shot = model.lcl.get_text_features(prompt_ids, prompt_mask)
    real = attention_mask.bool()
    assert out.num_contrastive_pairs == 2
    diffs = {
        "pooled": max_diff(vision.image_latents, expected["pooled"]),
        "tokens": max_diff(vision.image_token_embeds, expected["tokens"]),
        "logits": max_diff(out.logits[real], expected["logits"][real]),
        "text_embeds": max_diff(out.text_embeds, expected["text_embeds"]),
        "image_embeds": max_diff(out.image_embeds, expected["image_embeds"]),
        "zero_shot": max_diff(zero_shot, independent_zero_shot(sd, arch, prompt_ids, prompt_mask)),
        **{name: max_diff(getattr(out, name), expected[name])
           for name in ("loss_generation", "loss_contrastive", "loss")},
    }
    assert all(diff <= TOL for diff in diffs.values()), diffs
    return diffs


def write_config(tmp_path, arch) -> Path:
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps(arch.open_clip_config()))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny reference checkpoint saved as an OpenCLIP training checkpoint would be, and its config."""
    sd = reference_state_dict(TINY)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    return path, write_config(tmp_path, TINY), sd


def convert(checkpoint, config, out, **kwargs):
    kwargs.setdefault("processor", False)
    kwargs.setdefault("model_card", False)
    kwargs.setdefault("remote_code", False)
    return convert_checkpoint(checkpoint, config, out, **kwargs)


# ---------------------------------------------------------------------------------------------
# Round trip: reference layout -> convert -> load -> same outputs as the independent forward
# ---------------------------------------------------------------------------------------------


def test_tiny_round_trip_loads_with_auto_classes_and_matches_the_reference(tiny_checkpoint, tmp_path):
    checkpoint, config_path, sd = tiny_checkpoint
    out = tmp_path / "converted"
    result = convert(checkpoint, config_path, out, verify=True, remote_code=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "configuration_lcl.py", "loss_lcl.py", "model.safetensors", "modeling_lcl.py", "packing_lcl.py"]
    assert max(result.verification.values()) <= TOL

    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LCLForPreTraining"]
    assert config.auto_map["AutoModelForPreTraining"] == "modeling_lcl.LCLForPreTraining"
    pretraining, info = AutoModelForPreTraining.from_pretrained(out, output_loading_info=True)
    assert type(pretraining) is LCLForPreTraining
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    check_against_independent(pretraining.eval(), sd, TINY)

    base = AutoModel.from_pretrained(out)  # the lm_head weights are then unused
    assert type(base) is LCLModel
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(base.get_image_features(pixels), pretraining.lcl.get_image_features(pixels))
    base_state = base.state_dict()
    assert all(torch.equal(base_state[k.removeprefix("lcl.")], v) for k, v in pretraining.state_dict().items()
               if k.startswith("lcl."))


@pytest.mark.parametrize("arch", [B16_ONE_LAYER, B32_ONE_LAYER], ids=["vit-b-16-laion", "vit-b-32-laion"])
def test_reference_layouts_round_trip_with_one_block_per_tower(arch, tmp_path):
    sd = reference_state_dict(arch)
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file(sd, checkpoint)
    out = tmp_path / "converted"
    convert(checkpoint, write_config(tmp_path, arch), out)
    model = AutoModelForPreTraining.from_pretrained(out).eval()
    assert model.config.num_image_tokens == arch.num_patches
    check_against_independent(model, sd, arch)


@pytest.mark.slow
def test_full_vit_b16_laion_round_trip(tmp_path):
    sd = reference_state_dict(B16_FULL)
    checkpoint = tmp_path / "LCL_ViT-B-16_laion.pt"
    torch.save(sd, checkpoint)
    out = tmp_path / "converted"
    result = convert(checkpoint, "lcl-vit-b-16-laion", out, verify=True)
    assert max(result.verification.values()) <= TOL
    model = AutoModelForPreTraining.from_pretrained(out).eval()
    assert sum(p.numel() for p in model.parameters()) == 249_924_097
    check_against_independent(model, sd, B16_FULL)


def test_converting_twice_gives_byte_identical_safetensors(tiny_checkpoint, tmp_path):
    checkpoint, config_path, _ = tiny_checkpoint
    digests = []
    for name in ("first", "second"):
        convert(checkpoint, config_path, tmp_path / name)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    # Plain permissions (the staging folder and safetensors' own file are created owner-only).
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "first").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "first" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_key_mapping_follows_the_reference_layout(tiny_checkpoint):
    _, config_path, sd = tiny_checkpoint
    config, _ = resolve_model_config(config_path)
    converted = convert_state_dict(sd, config)
    width = TINY.vision_width
    qkv = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    layer = "lcl.vision_model.vit.encoder.layers.1.self_attn"
    assert torch.equal(converted[f"{layer}.k_proj.weight"], qkv[width:2 * width])
    assert torch.equal(converted["lcl.text_projection.weight"], sd["text.text_projection"].T)
    assert torch.equal(converted["lcl.vision_model.pooler.v_proj.bias"], sd["pool_project.pooler.cross_attn.v_bias"])
    assert torch.equal(converted["lm_head.proj.weight"], sd["lm_head.1.weight"])
    assert all(t.is_contiguous() for t in converted.values())
    # Fresh tensors: no output shares memory with the source or with another output.
    pointers = [t.untyped_storage().data_ptr() for t in converted.values()]
    assert len(set(pointers)) == len(pointers)


# ---------------------------------------------------------------------------------------------
# Processor and model card
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_tokenizer():
    from processing import build_test_tokenizer

    return build_test_tokenizer()


def test_folder_carries_a_processor_and_a_model_card(test_tokenizer, tmp_path):
    from processing import LCLProcessor

    ids = {name: test_tokenizer.convert_tokens_to_ids(name) for name in
           ("<start_of_text>", "<end_of_text>", "<img_placehold>", "<start_of_img>", "<end_of_img>")}
    arch = dataclasses.replace(TINY, vocab_size=len(test_tokenizer), special_ids=tuple(ids.values()))
    checkpoint = tmp_path / "run.pt"
    torch.save(reference_state_dict(arch), checkpoint)
    out = tmp_path / "converted"
    convert(checkpoint, write_config(tmp_path, arch), out, processor=True, tokenizer=test_tokenizer,
            model_card=True, verify=True)

    processor = LCLProcessor.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    assert processor.special_token_ids() == {name: getattr(config, name) for name in processor.special_token_ids()}
    assert processor.num_image_tokens == config.num_image_tokens == arch.num_patches
    prompts = processor(text=["a photo of a cat", "a dog"], return_tensors="pt")
    assert prompts.input_ids[0, 0] == ids["<start_of_text>"]
    model = AutoModel.from_pretrained(out)
    with torch.no_grad():
        assert model.get_text_features(prompts.input_ids, prompts.attention_mask).shape == (2, arch.text_width)

    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and "library_name: transformers" in readme
    assert "pipeline_tag: image-feature-extraction" in readme
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in readme
    assert "| generation_logits |" in readme  # the verification table


def test_tokenizer_that_disagrees_with_the_config_is_refused(test_tokenizer, tiny_checkpoint, tmp_path):
    checkpoint, config_path, _ = tiny_checkpoint  # ids 59..63, not the test tokenizer's
    out = tmp_path / "converted"
    with pytest.raises(ValueError, match="disagree on special token ids"):
        convert(checkpoint, config_path, out, processor=True, tokenizer=test_tokenizer)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Input formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt-wrapped", "bin-plain", "safetensors-module-prefix", "pt-compiled"])
def test_checkpoint_formats_give_the_same_weights(fmt, tiny_checkpoint, tmp_path):
    _, config_path, sd = tiny_checkpoint
    if fmt == "pt-wrapped":
        path = tmp_path / "a.pt"
        torch.save({"state_dict": sd, "optimizer": {"state": {}}, "epoch": 3}, path)
    elif fmt == "bin-plain":
        path = tmp_path / "a.bin"
        torch.save(sd, path)
    elif fmt == "safetensors-module-prefix":
        path = tmp_path / "a.safetensors"
        save_file({f"module.{k}": v for k, v in sd.items()}, path)
    else:
        path = tmp_path / "a.pt"
        torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, path)
    loaded = load_open_clip_state_dict(path)
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_half_precision_checkpoint_keeps_its_dtype(tmp_path):
    sd = {name: tensor.half() for name, tensor in reference_state_dict(TINY).items()}
    checkpoint = tmp_path / "fp16.pt"
    torch.save(sd, checkpoint)
    out = tmp_path / "converted"
    result = convert(checkpoint, write_config(tmp_path, TINY), out, verify=True)
    assert max(result.verification.values()) <= TOL  # the fp16 values, compared in fp32
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    assert AutoConfig.from_pretrained(out).dtype == torch.float16
    assert AutoModelForPreTraining.from_pretrained(out, dtype="auto").dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Strict accounting and failures that leave nothing behind
# ---------------------------------------------------------------------------------------------


def test_mismatched_checkpoint_lists_every_problem_and_writes_nothing(tmp_path):
    sd = reference_state_dict(TINY)
    sd["visual.proj"] = torch.zeros(32, 24)  # the projection the reference deletes
    del sd["pool_project.pooler.cross_attn.q_bias"]
    sd["text.positional_embedding"] = torch.zeros(77, TINY.text_width)  # wrong context length
    sd["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * 24, 32)
    checkpoint = tmp_path / "bad.pt"
    torch.save(sd, checkpoint)
    out = tmp_path / "converted"
    with pytest.raises(CheckpointMismatchError) as info:
        convert(checkpoint, write_config(tmp_path, TINY), out)
    message = str(info.value)
    assert "missing keys (1): pool_project.pooler.cross_attn.q_bias" in message
    assert "unexpected keys (1): visual.proj" in message
    target = "lcl.text_model.embeddings.position_embedding.weight"
    assert f"text.positional_embedding (77, 24) -> {target} (24, 24)" in message
    assert "text.transformer.resblocks.0.attn.in_proj_weight (72, 32)" in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_layer_count_mismatch_is_reported(tiny_checkpoint, tmp_path):
    checkpoint, _, _ = tiny_checkpoint
    deeper = dataclasses.replace(TINY, text_layers=3)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(12\): text.transformer.resblocks.2"):
        convert(checkpoint, write_config(tmp_path, deeper), tmp_path / "out")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_or_corrupt_file_is_a_clear_error_and_keeps_the_old_output(suffix, tmp_path):
    sd = reference_state_dict(TINY)
    good = tmp_path / f"good{suffix}"
    torch.save(sd, good) if suffix == ".pt" else save_file(sd, good)
    data = good.read_bytes()
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("previous conversion")
    config_path = write_config(tmp_path, TINY)
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"not a checkpoint" * 8)):
        bad = tmp_path / f"{name}{suffix}"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"Cannot read checkpoint .*{name}{suffix}.*truncated, corrupt"):
            convert(bad, config_path, out, overwrite=True)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_existing_output_needs_overwrite(tiny_checkpoint, tmp_path):
    checkpoint, config_path, _ = tiny_checkpoint
    out = tmp_path / "converted"
    convert(checkpoint, config_path, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(checkpoint, config_path, out)
    convert(checkpoint, config_path, out, overwrite=True)
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def test_verification_catches_a_wrong_conversion(tiny_checkpoint):
    _, config_path, sd = tiny_checkpoint
    config, _ = resolve_model_config(config_path)
    model = LCLForPreTraining(config)
    model.load_state_dict(convert_state_dict(sd, config))
    with pytest.raises(ValueError, match="eval mode"):
        verify_conversion(sd, model)
    diffs = verify_conversion(sd, model.eval())
    assert set(diffs) >= {"image_latents", "zero_shot_text_features", "generation_logits", "loss_contrastive",
                          "loss_generation"}
    check_verification(diffs)

    # A plausible bug: applying text_projection as P instead of P^T.
    with torch.no_grad():
        model.lcl.text_projection.weight.copy_(sd["text.text_projection"])
    diffs = verify_conversion(sd, model)
    assert diffs["zero_shot_text_features"] > 1e-2 and diffs["image_latents"] <= TOL
    with pytest.raises(ValueError, match="zero_shot_text_features"):
        check_verification(diffs)


def test_cli_verifies_and_prints_the_diffs(tiny_checkpoint, tmp_path, capsys):
    checkpoint, config_path, _ = tiny_checkpoint
    out = tmp_path / "cli"
    code = convert_lcl_checkpoint.main([
        "--checkpoint", str(checkpoint), "--model-config", str(config_path), "--output-dir", str(out),
        "--verify", "--no-processor", "--no-model-card",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("image_latents", "zero_shot_text_features", "generation_logits", "loss_generation"):
        assert name in printed
    assert (out / "model.safetensors").is_file()

    code = convert_lcl_checkpoint.main([
        "--checkpoint", str(tmp_path / "missing.pt"), "--model-config", str(config_path),
        "--output-dir", str(tmp_path / "x"),
    ])
    assert code == 1 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count",
    [("lcl-vit-b-16-laion", 249_924_097), ("LCL_ViT-B-32_laion", 177_659_905), ("lcl-vit-b-32-mmc4", 178_642_945)],
)
def test_reference_variants_have_the_reference_parameter_counts(name, count):
    config, variant = resolve_model_config(name)
    assert variant is not None
    with torch.device("meta"):
        model = LCLForPreTraining(config)
    assert sum(p.numel() for p in model.parameters()) == count


def test_model_config_sources(tmp_path):
    expected = config_from_open_clip(REFERENCE_VARIANTS["lcl-vit-b-32-laion"].open_clip_config).to_dict()
    path = tmp_path / "LCL_ViT-B-32_laion.json"
    path.write_text(json.dumps(REFERENCE_VARIANTS["lcl-vit-b-32-laion"].open_clip_config))
    from_json, variant = resolve_model_config(path)
    assert variant is None and from_json.to_dict() == expected
    from_json.save_pretrained(tmp_path / "lcl")
    assert resolve_model_config(tmp_path / "lcl")[0].to_dict() == expected
    given, _ = resolve_model_config(from_json)
    given.architectures = ["LCLForPreTraining"]
    assert from_json.architectures is None  # the caller's config is not modified
    with pytest.raises(ValueError, match="neither a reference variant"):
        resolve_model_config("LCL_ViT-L-14_laion")


@pytest.mark.parametrize(
    "section, option, value",
    [("vision_cfg", "ls_init_value", 0.1), ("text_cfg", "proj_bias", True), ("vision_cfg", "layers", [3, 4, 6, 3]),
     ("text_cfg", "hf_model_name", "roberta-base"), (None, "init_logit_bias", -10.0)],
)
def test_unsupported_open_clip_options_are_rejected(section, option, value):
    config = TINY.open_clip_config()
    (config[section] if section else config)[option] = value
    with pytest.raises(ValueError, match=option if option != "layers" else "ResNet"):
        config_from_open_clip(config)


def test_quick_gelu_and_head_width_are_carried_over():
    config = TINY.open_clip_config()
    config["quick_gelu"] = True
    lcl = config_from_open_clip(config)
    assert lcl.vision_config.hidden_act == lcl.text_config.hidden_act == "quick_gelu"
    assert lcl.vision_config.num_attention_heads == TINY.vision_width // TINY.head_width
    assert (lcl.image_token_id, lcl.image_start_token_id, lcl.eos_token_id) == (61, 62, 60)
