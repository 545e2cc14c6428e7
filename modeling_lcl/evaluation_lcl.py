"""Frozen-transfer evaluation of an LCL vision encoder: zero-shot classification, image-text retrieval
and linear probing, the three protocols of the paper's transfer tables.

- `build_zero_shot_classifier` / `zero_shot_logits`: CLIP's prompt-ensemble protocol on LCL features
  (`get_text_features` reads each prompt's `<eot>` as `<soi>`, see `LCLModel.get_text_features`).
- `retrieval_recall`: recall@K for image->text and text->image from normalised embeddings.
- `extract_image_features` + `linear_probe`: a linear classifier on frozen features, either
  scikit-learn's logistic regression (regularisation chosen on a held-out split) or a torch linear
  layer with early stopping.

Not part of the remote-code model files: this module may use numpy and (lazily) scikit-learn.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .modeling_lcl import LCLVisionModel

logger = logging.get_logger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
FEATURE_POOLINGS = ("latent", "mean")

# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


def vision_tower(model: nn.Module) -> LCLVisionModel:
    """The `LCLVisionModel` inside any LCL model (`LCLModel`, `LCLForPreTraining`, task heads, the tower itself)."""
    base = getattr(model, "base_model", model)
    tower = base if isinstance(base, LCLVisionModel) else getattr(base, "vision_model", None)
    if not isinstance(tower, LCLVisionModel):
        raise TypeError(f"{type(model).__name__} holds no LCLVisionModel.")
    return tower


@torch.no_grad()
def extract_image_features(
    model: nn.Module, pixel_values: torch.Tensor, pooling: str = "latent", batch_size: int = 256
) -> torch.Tensor:
    """Frozen image features `(num_images, width)` on the CPU, in float32.

    `pooling="latent"`: the pooled latent `z` (`projection_dim`); `"mean"`: the mean of the ViT's patch
    tokens after `ln_post` (`vision_hidden_size`). Neither is normalised.
    """
    if pooling not in FEATURE_POOLINGS:
        raise ValueError(f"pooling must be one of {FEATURE_POOLINGS}, got {pooling!r}.")
    tower = vision_tower(model)
    device, dtype = tower.device, tower.dtype
    features = []
    for chunk in pixel_values.split(batch_size):
        outputs = tower(chunk.to(device=device, dtype=dtype))
        chunk_features = outputs.image_latents if pooling == "latent" else outputs.last_hidden_state[:, 1:].mean(1)
        features.append(chunk_features.float().cpu())
    return torch.cat(features)


@torch.no_grad()
def encode_images(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised pooled latents `(num_images, projection_dim)`, float32 on the CPU."""
    return F.normalize(extract_image_features(model, pixel_values, "latent", batch_size), dim=-1)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised zero-shot text features `(num_texts, projection_dim)`, float32 on the CPU.

    `tokenizer` must wrap each text as `<sot> text <eot>` (the LCL tokenizer does); `model` is an
    `LCLModel` or any model whose `base_model` is one.
    """
    lcl = getattr(model, "base_model", model)
    if not hasattr(lcl, "get_text_features"):
        raise TypeError(f"{type(model).__name__} has no causal head to encode texts with (get_text_features).")
    max_length = lcl.config.text_config.max_position_embeddings
    features = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        embeds = lcl.get_text_features(
            batch["input_ids"].to(lcl.device), batch["attention_mask"].to(lcl.device), normalize=True
        )
        features.append(embeds.float().cpu())
    return torch.cat(features)


# ----------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def build_zero_shot_classifier(
    model: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings `(num_classes, projection_dim)` by prompt ensembling (CLIP's protocol).

    Each class name is put in every template (`"a photo of a {}."`), the normalised text features of
    its prompts are averaged, and the mean is normalised again.
    """
    if not class_names:
        raise ValueError("class_names is empty.")
    if not templates or any("{}" not in template for template in templates):
        raise ValueError(f"templates must be a non-empty list of strings with a '{{}}' slot, got {templates!r}.")
    prompts = [template.format(name) for name in class_names for template in templates]
    features = encode_texts(model, tokenizer, prompts, batch_size)
    features = features.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def zero_shot_logits(
    model: nn.Module, pixel_values: torch.Tensor, classifier: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Scaled cosine similarities `(num_images, num_classes)` of images with `build_zero_shot_classifier` rows."""
    lcl = getattr(model, "base_model", model)
    image_embeds = encode_images(model, pixel_values, batch_size)
    scale = lcl.logit_scale.exp().item() if hasattr(lcl, "logit_scale") else 1.0
    return scale * image_embeds @ classifier.T.to(image_embeds)


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k_values: Sequence[int] = (1, 5, 10)) -> dict:
    """Fraction of queries with a positive among their top K candidates, for each K.

    scores `(num_queries, num_candidates)`; positives: bool of the same shape, at least one per row.
    A query's rank is the number of *negatives* scoring at least as high as its best positive, so ties
    count against the query (a constant scorer gets no credit).
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape.")
    positives = positives.bool()
    if not positives.any(-1).all():
        missing = (~positives.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"Queries {missing[:10]} have no positive candidate.")
    best_positive = scores.masked_fill(~positives, -math.inf).amax(-1, keepdim=True)
    rank = ((scores >= best_positive) & ~positives).sum(-1)
    return {k: (rank < k).float().mean().item() for k in k_values}


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int] | None = None,
    k_values: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K of image->text and text->image retrieval.

    image_embeds `(num_images, dim)`, text_embeds `(num_texts, dim)` (normalised: cosine similarity);
    `text_to_image` `(num_texts,)` gives each text's image (several captions per image are allowed);
    by default text i describes image i. An image query is right when any of its captions is retrieved.

    Returns `{"image_to_text_recall@K": ..., "text_to_image_recall@K": ...}` for each K.
    """
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image is None:
        if num_images != num_texts:
            raise ValueError(
                f"{num_images} images and {num_texts} texts: pass text_to_image to say which text describes "
                "which image."
            )
        text_to_image = torch.arange(num_texts)
    text_to_image = torch.as_tensor(text_to_image, device=image_embeds.device)
    if text_to_image.shape != (num_texts,) or text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image must hold one image index in [0, {num_images}) per text.")
    scores = image_embeds.float() @ text_embeds.float().T  # (num_images, num_texts)
    positives = text_to_image[None, :] == torch.arange(num_images, device=scores.device)[:, None]
    image_to_text = recall_at_k(scores, positives, k_values)
    text_to_image_recall = recall_at_k(scores.T, positives.T, k_values)
    results = {f"image_to_text_recall@{k}": value for k, value in image_to_text.items()}
    results.update({f"text_to_image_recall@{k}": value for k, value in text_to_image_recall.items()})
    return results


# ----------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------


@dataclass
class LinearProbeResult:
    """accuracy on the evaluation set; predictions `(num_eval,)`; the fitted classifier (a scikit-learn
    `LogisticRegression` or a torch `nn.Linear` on standardised features); the chosen hyper-parameter
    (`C` for logistic regression, the best epoch for the torch probe)."""

    accuracy: float
    predictions: np.ndarray
    classifier: object
    hyperparameter: float


def _validation_split(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_samples)
    num_val = max(1, int(round(num_samples * fraction)))
    if num_val >= num_samples:
        raise ValueError(f"Cannot hold out a validation split from {num_samples} training samples.")
    return order[num_val:], order[:num_val]


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def linear_probe(
    train_features,
    train_labels,
    eval_features,
    eval_labels,
    method: str = "logistic",
    c_values: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    validation_fraction: float = 0.2,
    max_epochs: int = 200,
    patience: int = 10,
    learning_rate: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LinearProbeResult:
    """Fit a linear classifier on frozen features and report its accuracy on the evaluation set.

    Features `(num_samples, width)` (tensors or arrays), integer labels `(num_samples,)`.

    - `method="logistic"`: scikit-learn's `LogisticRegression` (L-BFGS, multinomial); the inverse
      regularisation `C` is picked from `c_values` on a held-out `validation_fraction` of the training
      set, then refit on the whole training set (CLIP's linear-probe protocol).
    - `method="torch"`: an `nn.Linear` trained full-batch with AdamW on standardised features; training
      stops once the validation loss has not improved for `patience` epochs, and the best epoch's
      weights are kept. The classifier then expects features standardised with the training statistics
      (kept as `classifier.feature_mean` / `classifier.feature_std` buffers).
    """
    x_train, y_train = _as_numpy(train_features).astype(np.float32), _as_numpy(train_labels).astype(np.int64)
    x_eval, y_eval = _as_numpy(eval_features).astype(np.float32), _as_numpy(eval_labels).astype(np.int64)
    if x_train.ndim != 2 or x_eval.ndim != 2 or x_train.shape[1] != x_eval.shape[1]:
        raise ValueError(f"Features must be 2-D with the same width, got {x_train.shape} and {x_eval.shape}.")
    if len(x_train) != len(y_train) or len(x_eval) != len(y_eval):
        raise ValueError("Each feature matrix needs exactly one label per row.")
    train_idx, val_idx = _validation_split(len(x_train), validation_fraction, seed)
    if method == "logistic":
        return _logistic_probe(x_train, y_train, x_eval, y_eval, train_idx, val_idx, c_values, seed)
    if method == "torch":
        return _torch_probe(x_train, y_train, x_eval, y_eval, train_idx, val_idx,
                            max_epochs, patience, learning_rate, weight_decay, seed)
    raise ValueError(f"method must be 'logistic' or 'torch', got {method!r}.")


def _logistic_probe(x_train, y_train, x_eval, y_eval, train_idx, val_idx, c_values, seed) -> LinearProbeResult:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def fit(c, x, y):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=seed)).fit(x, y)

    # One BLAS/OpenMP thread: these problems are small, and on a busy machine spinning worker threads make
    # the solver orders of magnitude slower (measured: minutes instead of seconds on 2 loaded cores).
    with threadpool_limits(limits=1):
        val_accuracy = {c: fit(c, x_train[train_idx], y_train[train_idx]).score(x_train[val_idx], y_train[val_idx])
                        for c in c_values}
        best_c = max(c_values, key=lambda c: (val_accuracy[c], -c))  # ties: the stronger regularisation
        logger.info(f"Linear probe: validation accuracy per C {val_accuracy}; using C={best_c}.")
        classifier = fit(best_c, x_train, y_train)
        predictions = classifier.predict(x_eval)
    return LinearProbeResult(float((predictions == y_eval).mean()), predictions, classifier, best_c)


class _StandardisedLinear(nn.Module):
    """`nn.Linear` on `(x - mean) / std`, with the training statistics kept as buffers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("feature_mean", mean)
        self.register_buffer("feature_std", std)
        self.linear = nn.Linear(mean.shape[-1], num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feature_mean) / self.feature_std)


def _torch_probe(x_train, y_train, x_eval, y_eval, train_idx, val_idx, max_epochs, patience, lr, weight_decay, seed):
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
        num_classes = int(max(y_train.max(), y_eval.max())) + 1
        mean = x[train_idx].mean(0)
        std = x[train_idx].std(0).clamp_min(1e-6)
        probe = _StandardisedLinear(mean, std, num_classes)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
        best = (math.inf, 0, {k: v.clone() for k, v in probe.state_dict().items()})
        for epoch in range(1, max_epochs + 1):
            optimizer.zero_grad()
            F.cross_entropy(probe(x[train_idx]), y[train_idx]).backward()
            optimizer.step()
            with torch.no_grad():
                val_loss = F.cross_entropy(probe(x[val_idx]), y[val_idx]).item()
            if val_loss < best[0]:
                best = (val_loss, epoch, {k: v.clone() for k, v in probe.state_dict().items()})
            elif epoch - best[1] >= patience:
                break
        probe.load_state_dict(best[2])
        logger.info(f"Linear probe: stopped after epoch {epoch}; best validation loss {best[0]:.4f} (epoch {best[1]}).")
        with torch.no_grad():
            predictions = probe(torch.from_numpy(x_eval)).argmax(-1).numpy()
    finally:
        torch.random.set_rng_state(generator_state)
    return LinearProbeResult(float((predictions == y_eval).mean()), predictions, probe, float(best[1]))


__all__ = [
    "DEFAULT_TEMPLATES",
    "LinearProbeResult",
    "build_zero_shot_classifier",
    "encode_images",
    "encode_texts",
    "extract_image_features",
    "linear_probe",
    "recall_at_k",
    "retrieval_recall",
    "vision_tower",
    "zero_shot_logits",
]
