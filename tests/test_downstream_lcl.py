"""Downstream use of a pre-trained LCL: image classification head, zero-shot helpers, retrieval recall,
linear probe (CPU, tiny configs)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EOT, SOT, tiny_config
from PIL import Image
from torch.utils.data import Dataset
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments, pipeline

from modeling_lcl import LCLForPreTraining, LCLModel
from modeling_lcl.evaluation_lcl import (
    build_zero_shot_classifier,
    encode_texts,
    extract_image_features,
    linear_probe,
    recall_at_k,
    retrieval_recall,
    zero_shot_logits,
)
from modeling_lcl.modeling_lcl_tasks import LCLForImageClassification
from processing import LCLImageProcessor, LCLProcessor, build_test_tokenizer


@pytest.fixture
def pretrained_dir(config, tmp_path):
    torch.manual_seed(0)
    model = LCLForPreTraining(config)
    model.save_pretrained(tmp_path / "pretrained")
    return tmp_path / "pretrained", model.eval()


# ---------------------------------------------------------------------------------------------
# LCLForImageClassification
# ---------------------------------------------------------------------------------------------


def test_classifier_loads_the_vision_tower_of_a_pretraining_checkpoint(pretrained_dir):
    path, pretrained = pretrained_dir
    id2label = {0: "zero", 1: "one", 2: "two"}
    model, info = AutoModelForImageClassification.from_pretrained(path, id2label=id2label, output_loading_info=True)
    assert isinstance(model, LCLForImageClassification)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"]  # the causal head is expected in the checkpoint, and ignored
    assert model.config.num_labels == 3 and model.config.id2label[2] == "two"
    expected_weights = pretrained.lcl.vision_model.state_dict()
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, expected_weights[name]), name
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features, _ = model.eval().get_image_representation(pixel_values)
        expected = pretrained.lcl.get_image_features(pixel_values)
    torch.testing.assert_close(features, expected)
    # The new head starts small and finite (initialised on load, not left empty).
    assert 0 < model.classifier.weight.abs().max() < 0.2


@pytest.mark.parametrize("pooling, width", [("latent", 32), ("mean", 32)])
def test_pooling_choice_is_read_from_the_config(pooling, width, tmp_path):
    config = tiny_config(num_labels=4, classifier_pooling=pooling, projection_dim=32)
    model = LCLForImageClassification(config).eval()
    assert model.classifier.in_features == width
    pixel_values = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        vision = model.vision_model(pixel_values)
    assert out.logits.shape == (3, 4)
    expected = vision.image_latents if pooling == "latent" else vision.last_hidden_state[:, 1:].mean(1)
    torch.testing.assert_close(out.logits, model.classifier(expected))
    model.save_pretrained(tmp_path)
    assert LCLForImageClassification.from_pretrained(tmp_path).pooling == pooling


def test_mean_pooling_width_is_the_vit_width():
    config = tiny_config(num_labels=2, classifier_pooling="mean", vision_config=dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8))
    assert LCLForImageClassification(config).classifier.in_features == 48


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="classifier_pooling must be one of"):
        LCLForImageClassification(tiny_config(num_labels=2, classifier_pooling="cls"))


def test_loss_is_cross_entropy_on_integer_labels():
    model = LCLForImageClassification(tiny_config(num_labels=3))
    labels = torch.tensor([0, 2, 1])
    out = model(torch.randn(3, 3, 16, 16), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.vision_model.vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    # The causal head is not part of this model.
    assert not any(name.startswith(("text_model", "lcl.")) for name, _ in model.named_parameters())


class BrightHalfDataset(Dataset):
    """Label 0: left half brighter, label 1: right half brighter; learnable by any vision tower."""

    def __init__(self, size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(size, 3, 16, 16, generator=generator) * 0.3
        self.labels = torch.arange(size) % 2
        self.pixel_values[self.labels == 0, :, :, :8] += 1.0
        self.pixel_values[self.labels == 1, :, :, 8:] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def test_stock_trainer_fine_tunes_the_classifier(pretrained_dir, tmp_path):
    path, _ = pretrained_dir
    model = LCLForImageClassification.from_pretrained(path, num_labels=2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=25, per_device_train_batch_size=16, learning_rate=3e-3,
        report_to=[], save_strategy="no", logging_steps=5, use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    dataset = BrightHalfDataset(32, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before


# ---------------------------------------------------------------------------------------------
# Zero-shot helpers (the tokenizer is stood in for by a fixed map: words -> ids, wrapped in <sot> ... <eot>)
# ---------------------------------------------------------------------------------------------


class WordTokenizer:
    """`tokenizer(texts, padding=True, ...)` with one id per word; enough for the helpers' contract."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        rows = [[SOT] + [self.vocab.setdefault(w, 1 + len(self.vocab)) for w in t.split()] + [EOT] for t in texts]
        length = max(map(len, rows))
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def lcl_model(config):
    torch.manual_seed(0)
    return LCLModel(config).eval()


def test_zero_shot_classifier_is_the_normalised_mean_over_templates(lcl_model):
    tokenizer = WordTokenizer()
    templates = ["a photo of {}", "a drawing of the {} here"]
    classifier = build_zero_shot_classifier(lcl_model, tokenizer, ["cat", "dog"], templates)
    assert classifier.shape == (2, 32)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(2))
    for row, name in enumerate(["cat", "dog"]):
        batch = tokenizer([t.format(name) for t in templates])
        with torch.no_grad():
            features = lcl_model.get_text_features(**batch, normalize=True)
        torch.testing.assert_close(classifier[row], F.normalize(features.mean(0), dim=-1))


def test_zero_shot_logits_equal_the_models_retrieval_logits(lcl_model):
    tokenizer = WordTokenizer()
    prompts = ["a photo of cat", "a photo of a small dog", "bird"]
    classifier = build_zero_shot_classifier(lcl_model, tokenizer, prompts, ["{}"])
    pixel_values = torch.randn(4, 3, 16, 16)
    logits = zero_shot_logits(lcl_model, pixel_values, classifier, batch_size=3)
    with torch.no_grad():
        expected = lcl_model(**tokenizer(prompts), pixel_values=pixel_values).logits_per_image
    torch.testing.assert_close(logits, expected)


def test_text_batches_do_not_change_text_features(lcl_model):
    tokenizer = WordTokenizer()
    texts = ["one", "two words", "three words here", "four"]
    torch.testing.assert_close(encode_texts(lcl_model, tokenizer, texts, batch_size=1),
                               encode_texts(lcl_model, tokenizer, texts, batch_size=4))


def test_bad_templates_are_rejected(lcl_model):
    with pytest.raises(ValueError, match="slot"):
        build_zero_shot_classifier(lcl_model, WordTokenizer(), ["cat"], ["a photo"])
    with pytest.raises(TypeError, match="no causal head"):
        encode_texts(LCLForImageClassification(lcl_model.config), WordTokenizer(), ["cat"])


# ---------------------------------------------------------------------------------------------
# transformers pipelines with the real LCL tokenizer and image processor
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    image_processor = LCLImageProcessor(size=16, crop_size=16)
    return LCLProcessor(image_processor=image_processor, tokenizer=build_test_tokenizer(), num_image_tokens=4,
                        max_length=48)


def processor_config(processor, **overrides):
    return tiny_config(text_config=dict(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=48),
                       **processor.special_token_ids(), **overrides)


def random_images(count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(count)]


def test_zero_shot_image_classification_pipeline_runs_on_an_lcl_model(processor, tmp_path):
    torch.manual_seed(0)
    model = LCLModel(processor_config(processor)).eval()
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)
    labels = ["cat", "small dog", "a red bird"]
    image = random_images(1)[0]
    results = classifier(image, candidate_labels=labels)
    assert sorted(r["label"] for r in results) == sorted(labels)
    assert sum(r["score"] for r in results) == pytest.approx(1.0, abs=1e-5)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # The scores are our zero-shot protocol: softmax over the prompt features of the default template.
    class_embeds = build_zero_shot_classifier(model, processor.tokenizer, labels, ["This is a photo of {}."])
    pixel_values = processor(images=[image])["pixel_values"]
    expected = zero_shot_logits(model, pixel_values, class_embeds).softmax(-1)[0]
    scores = {r["label"]: r["score"] for r in results}
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), expected, rtol=1e-4, atol=1e-5)

    # From a folder, as users load a trained model: the Auto classes find the model, tokenizer and image processor.
    LCLForPreTraining(model.config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    from_folder = pipeline("zero-shot-image-classification", model=str(tmp_path))
    assert isinstance(from_folder.model, LCLModel)
    assert len(from_folder(image, candidate_labels=labels)) == 3


def test_image_classification_pipeline_runs_on_the_classifier(processor):
    config = processor_config(processor, id2label={0: "even", 1: "odd"})
    model = LCLForImageClassification(config).eval()
    classify = pipeline("image-classification", model=model, image_processor=processor.image_processor)
    results = classify(random_images(2), top_k=2)
    assert [sorted(r["label"] for r in result) for result in results] == [["even", "odd"]] * 2
    logits = model(processor(images=random_images(2))["pixel_values"]).logits.softmax(-1)
    assert results[0][0]["score"] == pytest.approx(logits[0].max().item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Retrieval recall
# ---------------------------------------------------------------------------------------------


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.5, 0.1], [0.2, 0.2, 0.1]])
    positives = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0]]).bool()
    # Ranks: 0; 2 (two negatives above); 1 (a tie with a negative counts against the query).
    assert recall_at_k(scores, positives, (1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_retrieval_recall_with_several_captions_per_image():
    image_embeds = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]]), dim=-1)
    # Captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2 (but it is closer to image 1).
    text_embeds = F.normalize(torch.tensor([[1.0, 0.1], [0.9, -0.1], [0.1, 1.0], [0.0, 1.0]]), dim=-1)
    results = retrieval_recall(image_embeds, text_embeds, text_to_image=[0, 0, 1, 2], k_values=(1, 2))
    # Image 1 ranks caption 3 above its own caption 2; caption 3 ranks image 1 above image 2.
    assert results == {
        "image_to_text_recall@1": pytest.approx(2 / 3),
        "image_to_text_recall@2": 1.0,
        "text_to_image_recall@1": pytest.approx(3 / 4),
        "text_to_image_recall@2": 1.0,
    }


def test_retrieval_recall_is_one_for_matching_embeddings_and_low_for_a_constant_scorer():
    embeds = F.normalize(torch.randn(12, 8), dim=-1)
    perfect = retrieval_recall(embeds, embeds)
    assert all(value == 1.0 for value in perfect.values())
    constant = retrieval_recall(torch.ones(12, 8), torch.ones(12, 8), k_values=(1, 5))
    assert all(value == 0.0 for value in constant.values())


def test_retrieval_recall_input_errors():
    with pytest.raises(ValueError, match="pass text_to_image"):
        retrieval_recall(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="one image index"):
        retrieval_recall(torch.randn(3, 4), torch.randn(4, 4), text_to_image=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Frozen features and linear probe
# ---------------------------------------------------------------------------------------------


def test_features_are_the_same_from_every_lcl_model(pretrained_dir):
    path, pretrained = pretrained_dir
    classifier = LCLForImageClassification.from_pretrained(path, num_labels=2)
    pixel_values = torch.randn(5, 3, 16, 16)
    for pooling in ("latent", "mean"):
        from_pretraining = extract_image_features(pretrained, pixel_values, pooling, batch_size=2)
        from_classifier = extract_image_features(classifier, pixel_values, pooling)
        from_base = extract_image_features(pretrained.lcl, pixel_values, pooling)
        torch.testing.assert_close(from_pretraining, from_classifier)
        torch.testing.assert_close(from_pretraining, from_base)
    with pytest.raises(ValueError, match="pooling must be one of"):
        extract_image_features(pretrained, pixel_values, "cls")


def blobs(num_per_class: int, num_classes: int, width: int, seed: int, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, width)) * 2
    labels = np.repeat(np.arange(num_classes), num_per_class)
    return centers[labels] + spread * rng.normal(size=(len(labels), width)), labels


@pytest.mark.parametrize("method", ["logistic", "torch"])
def test_linear_probe_separates_separable_features(method):
    x_train, y_train = blobs(40, 4, 16, seed=0)
    x_eval, y_eval = blobs(20, 4, 16, seed=0)
    x_eval = x_eval + np.random.default_rng(1).normal(size=x_eval.shape) * 0.1
    kwargs = {"max_epochs": 60, "learning_rate": 0.05} if method == "torch" else {"c_values": (0.1, 1.0)}
    result = linear_probe(torch.tensor(x_train), torch.tensor(y_train), x_eval, y_eval, method=method, **kwargs)
    assert result.accuracy > 0.95
    assert result.predictions.shape == (80,)
    assert (result.predictions == y_eval).mean() == result.accuracy


def test_torch_probe_stops_early_when_validation_loss_stops_improving():
    rng = np.random.default_rng(0)
    x_train, y_train = rng.normal(size=(60, 32)), rng.integers(0, 3, 60)  # labels are noise: overfitting only
    result = linear_probe(x_train, y_train, x_train[:10], y_train[:10], method="torch", max_epochs=500, patience=5)
    assert result.hyperparameter < 100  # best epoch, far before max_epochs


def test_linear_probe_input_errors():
    with pytest.raises(ValueError, match="same width"):
        linear_probe(np.zeros((10, 3)), np.zeros(10), np.zeros((5, 4)), np.zeros(5))
    with pytest.raises(ValueError, match="method must be"):
        linear_probe(np.zeros((10, 3)), np.zeros(10), np.zeros((5, 3)), np.zeros(5), method="svm")
