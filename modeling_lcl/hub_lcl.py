"""Publishing LCL models: source code next to the weights, the model card, and the upload.

- `add_remote_code(folder)`: copies the model's source files into a saved folder and adds `auto_map` to its
  `config.json`, so `AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True)` works where this
  package is not installed.
- `build_model_card(...)`: a `huggingface_hub.ModelCard` whose metadata carries the library, tags,
  datasets, license, the run's losses and its evaluation results (`model-index`); `lcl_card_data(...)`, its
  metadata, is shared with the converter's template-rendered cards.
- `push_folder_to_hub(folder, repo_id)`: create the repository (if needed) and upload a saved folder in one
  commit, for folders saved outside a `Trainer`.
"""

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers.dynamic_module_utils import get_relative_import_files

from . import modeling_lcl

CONFIG_NAME = "config.json"

# `auto_map` entries of a saved folder: file stem + class, as transformers' dynamic-module loader reads them.
AUTO_MAP = {
    "AutoConfig": "configuration_lcl.LCLConfig",
    "AutoModel": "modeling_lcl.LCLModel",
    "AutoModelForPreTraining": "modeling_lcl.LCLForPreTraining",
}

DEFAULT_TAGS = ("lcl", "latent-compression-learning", "vision", "image-feature-extraction", "interleaved-image-text")


def model_code_files() -> list[Path]:
    """`modeling_lcl.py` and every file it imports relatively (configuration, loss)."""
    modeling_file = Path(modeling_lcl.__file__)
    return [modeling_file] + sorted(Path(f) for f in get_relative_import_files(str(modeling_file)))


def add_remote_code(folder: str | os.PathLike) -> list[str]:
    """Copy the model's source files into `folder` (a `save_pretrained` output) and set `auto_map` in its config.

    Returns the names of the copied files. The files only import torch, transformers, the standard library
    and each other (relatively), which is what `trust_remote_code=True` loading needs.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: save the model into {folder} first.")
    copied = []
    for source in model_code_files():
        shutil.copyfile(source, folder / source.name)
        copied.append(source.name)
    config = json.loads(config_path.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    _write_text_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return copied


def lcl_card_data(*, datasets=(), tags=(), **fields) -> ModelCardData:
    """Model-card metadata of every LCL model card (this module's and the converter's templates): library
    `transformers`, the LCL tags plus `tags`, pipeline `image-feature-extraction`, and `fields`."""
    return ModelCardData(
        library_name="transformers",
        datasets=list(datasets) or None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        pipeline_tag="image-feature-extraction",
        **fields,
    )


def build_model_card(
    model_name: str,
    config,
    *,
    license: str = "apache-2.0",
    datasets: list[str] | tuple[str, ...] = (),
    tags: list[str] | tuple[str, ...] = (),
    training_metrics: dict[str, float] | None = None,
    eval_results: list[EvalResult] | tuple[EvalResult, ...] = (),
    hyperparameters: dict[str, object] | None = None,
    description: str | None = None,
) -> ModelCard:
    """A model card for an LCL model: YAML metadata plus a short description, usage and result tables.

    Args:
        model_name: Name shown in the card and in `model-index`.
        config: The model's `LCLConfig` (sizes are reported in the card).
        license: SPDX-style license id for the metadata.
        datasets: Hub dataset ids or names the model was trained on.
        tags: Extra tags, added to the LCL tags.
        training_metrics: Final losses of the run, e.g. `{"loss": .., "loss_contrastive": .., "loss_generation": ..}`;
            stored in the metadata under `training_metrics` and shown in a table.
        eval_results: Evaluation results; stored as `model-index` and shown in a table.
        hyperparameters: Training settings shown in a table (learning rate, batch size, steps, ...).
        description: A paragraph about this particular model (data, purpose).
    """
    training_metrics = {name: float(value) for name, value in (training_metrics or {}).items()}
    card_data = lcl_card_data(
        model_name=model_name,
        license=license,
        datasets=datasets,
        tags=tags,
        eval_results=list(eval_results) or None,
        training_metrics=training_metrics or None,
    )
    sections = [
        f"# {model_name}",
        description
        or "A vision encoder pre-trained from scratch with Latent Compression Learning (LCL; Yang, Zhu, Zhu et al., "
        "NeurIPS 2024): a contrastive loss between each image's pooled latent and the causal model's output at "
        "the image's `<soi>`, plus next-token generation on interleaved image-text data.",
        _architecture_section(config),
        _usage_section(),
    ]
    if training_metrics:
        sections.append("## Training results\n\n" + _table(training_metrics.items(), ("metric", "value")))
    if eval_results:
        rows = [(f"{r.metric_name or r.metric_type} ({r.dataset_name})", r.metric_value) for r in eval_results]
        sections.append("## Evaluation\n\n" + _table(rows, ("metric", "value")))
    if hyperparameters:
        sections.append("## Training hyperparameters\n\n" + _table(hyperparameters.items(), ("setting", "value")))
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload LCL model",
    endpoint: str | None = None,
):
    """Create `repo_id` if needed and upload everything in `folder` in one commit; returns the `CommitInfo`."""
    api = HfApi(endpoint=endpoint, token=token, library_name="transformers")
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), commit_message=commit_message)


def _architecture_section(config) -> str:
    vision, text = config.vision_config, config.text_config
    rows = [
        ("vision encoder", f"ViT {vision.num_hidden_layers} layers × {vision.hidden_size}, "
                           f"{vision.image_size}px, patch {vision.patch_size} ({config.num_image_tokens} image tokens)"),
        ("causal model", f"{text.num_hidden_layers} layers × {text.hidden_size}, context {text.max_position_embeddings}, "
                         f"vocabulary {text.vocab_size}"),
        ("pooled latent", f"{config.projection_dim} ({config.pooler_num_attention_heads} pooling heads)"),
        ("loss weights", f"λ_con = {config.contrastive_loss_weight}, λ_gen = {config.generation_loss_weight}"),
    ]
    return "## Model\n\n" + _table(rows, ("part", "size"))


def _usage_section() -> str:
    return (
        "## Usage\n\n"
        "The modelling code ships with the weights, so the model loads with `trust_remote_code=True` alone. The "
        "processor (tokenizer + image processor) comes with `pip install lcl-transformers`, which also makes the "
        "model importable without remote code.\n\n"
        "```python\n"
        "import processing  # lcl-transformers: registers the LCL processor\n"
        "from transformers import AutoModel, AutoProcessor\n\n"
        'model = AutoModel.from_pretrained("<this repo or folder>", trust_remote_code=True)\n'
        'processor = AutoProcessor.from_pretrained("<this repo or folder>")\n'
        'pixel_values = processor(images=images)["pixel_values"]\n'
        "image_features = model.get_image_features(pixel_values)  # (num_images, projection_dim)\n"
        'prompts = processor(text=["a photo of a cat", "a photo of a dog"])  # <sot> prompt <eot>\n'
        "text_features = model.get_text_features(prompts.input_ids, prompts.attention_mask)\n"
        "```"
    )


def _table(rows, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    for name, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


__all__ = ["AUTO_MAP", "add_remote_code", "build_model_card", "model_code_files", "push_folder_to_hub"]
