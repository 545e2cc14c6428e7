"""Convert OpenCLIP-format LCL checkpoints (the reference layout) into Transformers folders.

The reference model (OpenGVLab/LCL, built on OpenCLIP) saves a plain state dict whose layout is given in
DESIGN.md section 2. Conversion is five small steps, each a function here:

1. `load_open_clip_state_dict`: read a `.pt`/`.bin`/`.safetensors` file, unwrap a training checkpoint's
   `state_dict`, strip `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes.
2. `resolve_model_config`: turn a reference variant name, an OpenCLIP model-config JSON or an `LCLConfig`
   into an `LCLConfig` (`config_from_open_clip` does the OpenCLIP part).
3. `convert_state_dict`: rename and reshape every tensor with strict accounting (every source key used,
   every parameter of `LCLForPreTraining` set, every shape right), otherwise one error listing everything.
4. `verify_conversion` (`verify_lcl.py`): run a reference-equivalent forward written on the *source*
   tensors (OpenCLIP's own attention op on `in_proj_weight`, `x @ P`, the pooling block's separate biases)
   against the converted model and report the max abs differences.
5. `convert_checkpoint`: all of the above, writing `config.json`, `model.safetensors`, the processor and a
   model card into a temporary folder beside the output that is renamed into place only once complete
   (and verified, when asked), so a failure never leaves a half-written folder.

The file is deterministic: converting the same checkpoint twice gives byte-identical `model.safetensors`.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .configuration_lcl import LCLConfig
from .hub_lcl import lcl_card_data
from .modeling_lcl import LCLForPreTraining
from .verify_lcl import VERIFY_TOLERANCE, check_verification, make_verification_inputs, verify_conversion

logger = logging.get_logger(__name__)

HUB_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "hub_configs"
SAFE_WEIGHTS_NAME = "model.safetensors"
# Fixed metadata: transformers requires "format", and nothing variable (time, paths) may enter the file.
SAFETENSORS_METADATA = {"format": "pt"}

# ----------------------------------------------------------------------------------------------
# Reference variants (the model configs of the reference repository, as data)
# ----------------------------------------------------------------------------------------------

REFERENCE_SPECIAL_TOKEN_IDS = {
    "<start_of_text>": 49406,
    "<end_of_text>": 49407,
    "<img_placehold>": 49408,
    "<start_of_img>": 49409,
    "<end_of_img>": 49410,
}


def _reference_open_clip_config(patch_size: int, text_width: int, heads: int, context_length: int) -> dict:
    """OpenCLIP model config of a reference LCL ViT-B: 224px ViT (768 wide, 12 layers), 12-layer causal text."""
    return {
        "embed_dim": text_width,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": patch_size},
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49411,
            "width": text_width,
            "heads": heads,
            "layers": 12,
        },
        "pool_project_cfg": {
            "pool_proj_type": "attn", "input_dim": 768, "output_dim": text_width, "attn_num_heads": heads
        },
        "special_token_ids": dict(REFERENCE_SPECIAL_TOKEN_IDS),
    }


@dataclasses.dataclass(frozen=True)
class ReferenceVariant:
    """A published or reference LCL variant: its OpenCLIP config and what its model card states."""

    name: str  # our folder name, under hub_configs/
    open_clip_name: str  # the reference repository's model-config name
    open_clip_config: dict
    title: str
    datasets: tuple[str, ...]
    published_repo: str | None = None  # the Hub repo of the original OpenCLIP weights, when published
    license: str = "mit"  # the reference code and weights (OpenGVLab/LCL) are MIT-licensed


REFERENCE_VARIANTS = {
    variant.name: variant
    for variant in (
        ReferenceVariant(
            "lcl-vit-b-16-laion", "LCL_ViT-B-16_laion", _reference_open_clip_config(16, 768, 12, 280),
            "LCL ViT-B/16 pre-trained on LAION-400M", ("laion400m",), "OpenGVLab/LCL-ViT-B-16-Laion",
        ),
        ReferenceVariant(
            "lcl-vit-b-32-laion", "LCL_ViT-B-32_laion", _reference_open_clip_config(32, 512, 8, 128),
            "LCL ViT-B/32 pre-trained on LAION-400M", ("laion400m",),
        ),
        ReferenceVariant(
            "lcl-vit-b-32-mmc4", "LCL_ViT-B-32_mmc4", _reference_open_clip_config(32, 512, 8, 2048),
            "LCL ViT-B/32 pre-trained on MMC4", ("mmc4",),
        ),
    )
}


def find_reference_variant(name: str) -> ReferenceVariant | None:
    """The variant called `name` (our folder name or the reference config name, any case), else None."""
    key = name.lower()
    for variant in REFERENCE_VARIANTS.values():
        if key in (variant.name, variant.open_clip_name.lower()):
            return variant
    return None


# ----------------------------------------------------------------------------------------------
# OpenCLIP model config -> LCLConfig
# ----------------------------------------------------------------------------------------------

# Options of OpenCLIP's tower configs that change the math or add parameters our model does not have,
# with the only value we accept. Options absent here (dropout, tokenizer settings, pooling types the
# LCL forward bypasses) do not affect inference.
_UNSUPPORTED_VISION_OPTIONS = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "timm_model_name": None,
    "norm_kwargs": None,
    "act_kwargs": None,
}
_UNSUPPORTED_TEXT_OPTIONS = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "hf_model_name": None,
    "norm_kwargs": None,
    "act_kwargs": None,
}


def _check_options(section: str, cfg: dict, accepted: dict) -> None:
    for option, value in accepted.items():
        if cfg.get(option, value) != value:
            raise ValueError(
                f"OpenCLIP option {section}.{option}={cfg[option]!r} is not supported by LCLConfig "
                f"(only {value!r}); this checkpoint cannot be converted exactly."
            )


def config_from_open_clip(open_clip_config: dict) -> LCLConfig:
    """Build the `LCLConfig` of an OpenCLIP LCL model config (`embed_dim`, `vision_cfg`, `text_cfg`,
    `pool_project_cfg`, `special_token_ids`). Missing entries take OpenCLIP's dataclass defaults.
    """
    for section in ("vision_cfg", "text_cfg", "special_token_ids"):
        if section not in open_clip_config:
            raise ValueError(f"OpenCLIP LCL model config has no '{section}' entry.")
    vision = open_clip_config["vision_cfg"]
    text = open_clip_config["text_cfg"]
    pool = open_clip_config.get("pool_project_cfg", {})
    special = open_clip_config["special_token_ids"]
    _check_options("vision_cfg", vision, _UNSUPPORTED_VISION_OPTIONS)
    _check_options("text_cfg", text, _UNSUPPORTED_TEXT_OPTIONS)
    _check_options("model config", open_clip_config, {"init_logit_bias": None})  # a SigLIP-style bias

    layers = vision.get("layers", 12)
    if not isinstance(layers, int):
        raise ValueError(f"vision_cfg.layers={layers!r} describes a ResNet; only ViT LCL models can be converted.")
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"Non-square image_size {image_size} is not supported.")
        image_size = image_size[0]
    if pool.get("pool_proj_type", "attn") != "attn":
        raise ValueError(f"pool_project_cfg.pool_proj_type={pool['pool_proj_type']!r} is not supported (only 'attn').")

    embed_dim = open_clip_config.get("embed_dim", 512)
    vision_width = vision.get("width", 768)
    if pool.get("input_dim", 768) != vision_width or pool.get("output_dim", 512) != embed_dim:
        raise ValueError(
            f"pool_project_cfg maps {pool.get('input_dim', 768)} -> {pool.get('output_dim', 512)}, but the vision "
            f"width is {vision_width} and embed_dim is {embed_dim}."
        )
    missing_ids = sorted(set(REFERENCE_SPECIAL_TOKEN_IDS) - set(special))
    if missing_ids:
        raise ValueError(f"special_token_ids lacks {missing_ids}.")

    act = "quick_gelu" if open_clip_config.get("quick_gelu", False) else "gelu"
    text_width = text.get("width", 512)
    return LCLConfig(
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": layers,
            "num_attention_heads": vision_width // vision.get("head_width", 64),
            "image_size": image_size,
            "patch_size": vision.get("patch_size", 16),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        text_config={
            "vocab_size": text.get("vocab_size", 49408),
            "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        projection_dim=embed_dim,
        # AttentivePoolingProjection falls back to 64-wide heads when the count is null.
        pooler_num_attention_heads=pool.get("attn_num_heads", 8) or embed_dim // 64,
        image_token_id=special["<img_placehold>"],
        image_start_token_id=special["<start_of_img>"],
        image_end_token_id=special["<end_of_img>"],
        bos_token_id=special["<start_of_text>"],
        eos_token_id=special["<end_of_text>"],
        pad_token_id=text.get("pad_id", 0),
    )


def resolve_model_config(spec: str | os.PathLike | dict | LCLConfig) -> tuple[LCLConfig, ReferenceVariant | None]:
    """`LCLConfig` (and the reference variant, if any) of a model-config specification.

    `spec` may be a reference variant (`"lcl-vit-b-16-laion"` or `"LCL_ViT-B-16_laion"`), an OpenCLIP model
    config (dict or JSON file), an `LCLConfig` JSON file or folder, or an `LCLConfig`.
    """
    if isinstance(spec, LCLConfig):
        return copy.deepcopy(spec), None  # the conversion sets architectures/dtype on its own copy
    if isinstance(spec, dict):
        return config_from_open_clip(spec), None
    variant = find_reference_variant(str(spec)) if not Path(spec).exists() else None
    if variant is not None:
        return config_from_open_clip(variant.open_clip_config), variant
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = ", ".join(v.name for v in REFERENCE_VARIANTS.values())
        raise ValueError(f"Model config '{spec}' is neither a reference variant ({names}) nor an existing JSON file.")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read model config {path}: {error}") from error
    if data.get("model_type") == LCLConfig.model_type:
        return LCLConfig.from_dict(data), None
    if "vision_cfg" in data:
        return config_from_open_clip(data), None
    raise ValueError(f"{path} is neither an OpenCLIP LCL model config (no 'vision_cfg') nor an LCLConfig.")


# ----------------------------------------------------------------------------------------------
# Reading the source checkpoint
# ----------------------------------------------------------------------------------------------

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_open_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an OpenCLIP checkpoint, keyed by reference names.

    Reads `.safetensors` with safetensors and anything else with `torch.load(weights_only=True)`; unwraps
    `{"state_dict": ...}` training checkpoints; strips `module.` and `_orig_mod.` prefixes. A truncated,
    corrupt or non-checkpoint file raises a ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            loaded = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling a damaged file raises anything (OSError, KeyError, ...)
        raise ValueError(
            f"Cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch/safetensors state dict "
            f"({type(error).__name__}: {error})."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # an OpenCLIP training checkpoint: {"epoch", "name", "state_dict", ...}
    if not isinstance(loaded, dict) or not loaded:
        raise ValueError(f"Checkpoint {path} holds no state dict (found {type(loaded).__name__}).")
    not_tensors = sorted(key for key, value in loaded.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"Checkpoint {path} has entries that are not tensors: {not_tensors[:10]}.")
    return _strip_wrapper_prefixes(loaded, path)


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, tensor in state_dict.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in stripped:
            raise ValueError(f"Checkpoint {path} has key '{name}' both with and without a module./_orig_mod. prefix.")
        stripped[name] = tensor
    return stripped


# ----------------------------------------------------------------------------------------------
# Key mapping with strict accounting
# ----------------------------------------------------------------------------------------------


def _identity(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


def _split_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # nn.MultiheadAttention stacks q, k, v along dim 0 of in_proj_weight / in_proj_bias.
    return tuple(tensor.chunk(3, dim=0))


def _transpose(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The reference applies text_projection as x @ P; a Linear computes x @ W.T, so W = P.T.
    return (tensor.T,)


class KeyRule(NamedTuple):
    """One source tensor and the target parameter(s) it becomes."""

    source: str
    targets: tuple[str, ...]
    transform: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _identity


_VIT = "lcl.vision_model.vit."
_POOLER = "lcl.vision_model.pooler."


def _block_rules(source: str, target: str) -> list[KeyRule]:
    """An OpenCLIP `ResidualAttentionBlock` -> a CLIP-layout block (vision encoder layer or causal layer)."""
    rules = [KeyRule(f"{source}attn.in_proj_{kind}", tuple(f"{target}self_attn.{p}_proj.{kind}" for p in "qkv"),
                     _split_qkv) for kind in ("weight", "bias")]
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for old, new in renames.items():
        rules += [KeyRule(f"{source}{old}.{kind}", (f"{target}{new}.{kind}",)) for kind in ("weight", "bias")]
    return rules


def _layer_norm_rules(source: str, target: str) -> list[KeyRule]:
    return [KeyRule(f"{source}.{kind}", (f"{target}.{kind}",)) for kind in ("weight", "bias")]


def key_rules(config: LCLConfig) -> list[KeyRule]:
    """Every reference key of a model with this config and the parameter(s) of `LCLForPreTraining` it sets."""
    rules = [
        KeyRule("logit_scale", ("lcl.logit_scale",)),
        KeyRule("visual.conv1.weight", (f"{_VIT}embeddings.patch_embedding.weight",)),
        KeyRule("visual.class_embedding", (f"{_VIT}embeddings.class_embedding",)),
        KeyRule("visual.positional_embedding", (f"{_VIT}embeddings.position_embedding.weight",)),
        *_layer_norm_rules("visual.ln_pre", f"{_VIT}pre_layrnorm"),
        *_layer_norm_rules("visual.ln_post", f"{_VIT}post_layernorm"),
        KeyRule("text.token_embedding.weight", ("lcl.text_model.embeddings.token_embedding.weight",)),
        KeyRule("text.positional_embedding", ("lcl.text_model.embeddings.position_embedding.weight",)),
        *_layer_norm_rules("text.ln_final", "lcl.text_final_layer_norm"),
        KeyRule("text.text_projection", ("lcl.text_projection.weight",), _transpose),
        KeyRule("pool_project.query_token", (f"{_POOLER}probe",)),
        KeyRule("pool_project.pooler.cross_attn.proj.weight", (f"{_POOLER}out_proj.weight",)),
        *_layer_norm_rules("lm_head.0", "lm_head.layer_norm"),
        KeyRule("lm_head.1.weight", ("lm_head.proj.weight",)),
    ]
    for p in "qkv":
        rules += _layer_norm_rules(f"pool_project.pooler.norm1_{p}", f"{_POOLER}layer_norm_{p}")
        rules.append(KeyRule(f"pool_project.pooler.cross_attn.{p}.weight", (f"{_POOLER}{p}_proj.weight",)))
        rules.append(KeyRule(f"pool_project.pooler.cross_attn.{p}_bias", (f"{_POOLER}{p}_proj.bias",)))
    for i in range(config.vision_config.num_hidden_layers):
        rules += _block_rules(f"visual.transformer.resblocks.{i}.", f"{_VIT}encoder.layers.{i}.")
    for i in range(config.text_config.num_hidden_layers):
        rules += _block_rules(f"text.transformer.resblocks.{i}.", f"lcl.text_model.layers.{i}.")
    return rules


def target_shapes(config: LCLConfig) -> dict[str, torch.Size]:
    """Name -> shape of every entry of `LCLForPreTraining(config).state_dict()` (built on the meta device)."""
    with torch.device("meta"):
        model = LCLForPreTraining(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


class CheckpointMismatchError(ValueError):
    """The source checkpoint does not match the model config; the message lists every problem."""


def convert_state_dict(source: dict[str, torch.Tensor], config: LCLConfig) -> dict[str, torch.Tensor]:
    """Reference-layout tensors -> the state dict of `LCLForPreTraining(config)`, strictly.

    Every source key must be consumed, every target parameter set, every shape match; otherwise a
    `CheckpointMismatchError` lists the unexpected source keys, the missing ones and the shape mismatches.
    Returned tensors are fresh, contiguous copies in the source dtype.
    """
    rules = key_rules(config)
    expected = target_shapes(config)
    produced = {target for rule in rules for target in rule.targets}
    if produced != set(expected):  # the mapping and the model code disagree: a bug here, not in the file
        raise RuntimeError(
            f"Key rules out of sync with LCLForPreTraining: not produced {sorted(set(expected) - produced)}, "
            f"unknown {sorted(produced - set(expected))}."
        )

    rule_sources = {rule.source for rule in rules}
    unexpected = sorted(set(source) - rule_sources)
    missing = sorted(rule_sources - set(source))
    mismatched = []
    converted = {}
    for rule in rules:
        if rule.source not in source:
            continue
        tensor = source[rule.source]
        outputs = rule.transform(tensor)
        shapes_ok = len(outputs) == len(rule.targets) and all(
            out.shape == expected[target] for out, target in zip(outputs, rule.targets, strict=True)
        )
        if not shapes_ok:
            wanted = ", ".join(f"{target} {tuple(expected[target])}" for target in rule.targets)
            mismatched.append(f"{rule.source} {tuple(tensor.shape)} -> {wanted}")
            continue
        for out, target in zip(outputs, rule.targets, strict=True):
            converted[target] = out.detach().clone(memory_format=torch.contiguous_format)

    if unexpected or missing or mismatched:
        lines = ["The checkpoint does not match the model config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}):")
            lines += [f"    {line}" for line in mismatched]
        lines.append("Check the model config (variant, layer counts, widths, context length) against the checkpoint.")
        raise CheckpointMismatchError("\n".join(lines))
    return converted


# ----------------------------------------------------------------------------------------------
# Writing the output folder
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir`; rename it to `output_dir` only if the block succeeds.

    On any error the temporary folder is removed and `output_dir` is left as it was. An existing
    non-empty `output_dir` is an error unless `overwrite`, in which case it is replaced at the end.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists and is not empty; pass overwrite=True to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        _set_default_permissions(staging)
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, retired / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _set_default_permissions(folder: Path) -> None:
    """Give `folder` and its files the permissions of a plain mkdir/open under the current umask
    (mkdtemp and safetensors both create owner-only entries)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors in sorted key order with fixed metadata, so equal inputs give byte-identical files."""
    tensors = {name: state_dict[name].contiguous() for name in sorted(state_dict)}
    save_file(tensors, str(path), metadata=dict(SAFETENSORS_METADATA))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _floating_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
    # Mixed checkpoints (e.g. fp32 logit_scale beside fp16 weights) are loaded at the widest dtype.
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).bits) if dtypes else torch.float32


def default_model_card_template(variant: ReferenceVariant | None) -> Path:
    """The Jinja template of a variant's model card in `hub_configs/` (the generic one for custom configs)."""
    folder = HUB_CONFIGS_DIR / variant.name if variant is not None else HUB_CONFIGS_DIR
    path = folder / "model_card_template.md"
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template {path} not found (hub_configs/ ships with the repository); pass "
            "model_card_template=... or model_card=False."
        )
    return path


def build_model_card(
    config: LCLConfig,
    template: str | os.PathLike,
    variant: ReferenceVariant | None = None,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    **template_kwargs,
) -> ModelCard:
    """A `ModelCard` rendered from `template` (a converted checkpoint's card, see `hub_configs/`), with the
    metadata of every LCL card (`hub_lcl.lcl_card_data`).

    `license` and `datasets` default to the variant's; `template_kwargs` fill the template's own variables
    (e.g. `source_checkpoint`, `verification`, `repo_id`). Cards of trained runs: `hub_lcl.build_model_card`.
    """
    card_data = lcl_card_data(
        license=license or (variant.license if variant is not None else None),
        datasets=datasets or (list(variant.datasets) if variant is not None else ()),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        config=config,
        num_image_tokens=config.num_image_tokens,
        **template_kwargs,
    )


def build_processor(config: LCLConfig, tokenizer=None):
    """The reference processor: CLIP BPE with the three image tokens (or `tokenizer`), and the reference
    eval transform at the model's image size. Raises if the tokenizer's special ids disagree with `config`.
    """
    from processing import LCLImageProcessor, LCLProcessor, build_clip_tokenizer  # only needed to write folders

    size = config.vision_config.image_size
    processor = LCLProcessor(
        image_processor=LCLImageProcessor(size=size, crop_size=size),
        tokenizer=tokenizer if tokenizer is not None else build_clip_tokenizer(),
        num_image_tokens=config.num_image_tokens,
        max_length=config.text_config.max_position_embeddings,
    )
    tokenizer_ids = processor.special_token_ids()
    mismatched = {
        name: {"tokenizer": token_id, "config": getattr(config, name)}
        for name, token_id in tokenizer_ids.items()
        if getattr(config, name) != token_id
    }
    if mismatched:
        raise ValueError(f"The tokenizer and the model config disagree on special token ids: {mismatched}.")
    return processor


@dataclasses.dataclass
class ConversionResult:
    output_dir: Path
    config: LCLConfig
    variant: ReferenceVariant | None
    verification: dict[str, float] | None


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    model_config: str | os.PathLike | dict | LCLConfig,
    output_dir: str | os.PathLike,
    *,
    verify: bool = False,
    tolerance: float = VERIFY_TOLERANCE,
    processor: bool = True,
    tokenizer=None,
    model_card: bool = True,
    model_card_template: str | os.PathLike | None = None,
    remote_code: bool = True,
    overwrite: bool = False,
    seed: int = 0,
) -> ConversionResult:
    """Convert an OpenCLIP-format LCL checkpoint into a Transformers folder loadable with
    `AutoModel.from_pretrained` (and `AutoModelForPreTraining`).

    Writes `config.json`, `model.safetensors` and, unless disabled, the processor files (CLIP BPE, or
    `tokenizer`), `README.md` (model card from `model_card_template`, by default the variant's in
    `hub_configs/`) and the model's source files with `auto_map` (`remote_code`, for
    `trust_remote_code=True` loading where this package is not installed). With `verify=True` the written
    folder is loaded back and compared with the reference-equivalent forward before it is moved into
    place; a difference above `tolerance` aborts and leaves no output.
    """
    checkpoint = Path(checkpoint)
    config, variant = resolve_model_config(model_config)
    source = load_open_clip_state_dict(checkpoint)
    state_dict = convert_state_dict(source, config)
    config.architectures = ["LCLForPreTraining"]
    config.dtype = _floating_dtype(state_dict)
    template = model_card_template
    if model_card and template is None:
        template = default_model_card_template(variant)

    verification = None
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        config.save_pretrained(staging)
        save_safetensors(state_dict, staging / SAFE_WEIGHTS_NAME)
        if processor:
            build_processor(config, tokenizer).save_pretrained(staging)
        if remote_code:
            from .hub_lcl import add_remote_code  # publishing helpers; not needed for a plain conversion

            add_remote_code(staging)
        if verify:
            model = LCLForPreTraining.from_pretrained(staging, dtype=torch.float32)
            verification = verify_conversion(source, model, seed=seed)
            check_verification(verification, tolerance)
        if model_card:
            card = build_model_card(
                config,
                template,
                variant,
                source_checkpoint=checkpoint.name,
                source_sha256=_sha256(checkpoint),
                verification=verification,
            )
            card.save(staging / "README.md")
    logger.info(f"Converted {checkpoint} into {output_dir}.")
    return ConversionResult(Path(output_dir), config, variant, verification)


__all__ = [
    "REFERENCE_VARIANTS",
    "ReferenceVariant",
    "CheckpointMismatchError",
    "ConversionResult",
    "KeyRule",
    "atomic_output_dir",
    "build_model_card",
    "build_processor",
    "check_verification",
    "config_from_open_clip",
    "convert_checkpoint",
    "convert_state_dict",
    "find_reference_variant",
    "key_rules",
    "load_open_clip_state_dict",
    "make_verification_inputs",
    "default_model_card_template",
    "resolve_model_config",
    "save_safetensors",
    "target_shapes",
    "verify_conversion",
    "VERIFY_TOLERANCE",
]
