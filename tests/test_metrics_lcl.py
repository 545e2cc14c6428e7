"""The local `evaluate` metric modules in `metrics/`: loaded from a path with the Hub switched off."""

import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

from modeling_lcl.evaluation_lcl import retrieval_recall

METRICS = Path(__file__).resolve().parents[1] / "metrics"


@pytest.fixture(scope="module")
def zero_shot_accuracy():
    return evaluate.load(str(METRICS / "zero_shot_accuracy"))


@pytest.fixture(scope="module")
def retrieval_recall_metric():
    return evaluate.load(str(METRICS / "retrieval_recall"))


def test_metrics_load_offline_from_their_folder(tmp_path):
    # A fresh interpreter with the Hub off and an empty cache: nothing may come from the network.
    code = (
        "import evaluate, sys\n"
        f"m = evaluate.load({str(METRICS / 'zero_shot_accuracy')!r})\n"
        "print(m.compute(predictions=[[0.2, 0.8], [0.6, 0.4]], references=[1, 1], k_values=[1]))\n"
        f"r = evaluate.load({str(METRICS / 'retrieval_recall')!r})\n"
        "print(r.compute(predictions=[[0.2, 0.8]], references=[[1]], k_values=[1]))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "{'top1_accuracy': 0.5, 'mean_per_class_recall': 0.5}",
        "{'recall@1': 1.0}",
    ]


def test_zero_shot_accuracy_by_hand(zero_shot_accuracy):
    scores = [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]]
    # True-class ranks: 0, 2 (0.1 ties with a 0.1 and loses), 0, 1.
    results = zero_shot_accuracy.compute(predictions=scores, references=[1, 2, 2, 2], k_values=[1, 2, 3])
    assert results["top1_accuracy"] == pytest.approx(2 / 4)
    assert results["top2_accuracy"] == pytest.approx(3 / 4)
    assert results["top3_accuracy"] == 1.0
    # Class 1: 1/1 right; class 2: 1/3 right.
    assert results["mean_per_class_recall"] == pytest.approx((1 + 1 / 3) / 2)


def test_zero_shot_accuracy_top1_matches_argmax_without_ties(zero_shot_accuracy):
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(50, 7)), rng.integers(0, 7, 50)
    results = zero_shot_accuracy.compute(predictions=scores, references=labels, k_values=[1, 7])
    assert results["top1_accuracy"] == pytest.approx((scores.argmax(1) == labels).mean())
    assert results["top7_accuracy"] == 1.0


def test_zero_shot_accuracy_rejects_bad_labels(zero_shot_accuracy):
    with pytest.raises(ValueError, match="class indices"):
        zero_shot_accuracy.compute(predictions=[[0.1, 0.9]], references=[2])


def test_retrieval_recall_metric_equals_the_torch_helper(retrieval_recall_metric):
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    texts = torch.nn.functional.normalize(images.repeat_interleave(2, 0) + 0.8 * torch.randn(40, 8), dim=-1)
    text_to_image = torch.arange(20).repeat_interleave(2)
    expected = retrieval_recall(images, texts, text_to_image, k_values=(1, 5, 10))
    scores = (images @ texts.T).numpy()
    captions = [[2 * i, 2 * i + 1] for i in range(20)]
    image_to_text = retrieval_recall_metric.compute(predictions=scores, references=captions, k_values=[1, 5, 10])
    text_to_image_results = retrieval_recall_metric.compute(
        predictions=scores.T, references=[[i] for i in text_to_image.tolist()], k_values=[1, 5, 10]
    )
    for k in (1, 5, 10):
        assert image_to_text[f"recall@{k}"] == pytest.approx(expected[f"image_to_text_recall@{k}"])
        assert text_to_image_results[f"recall@{k}"] == pytest.approx(expected[f"text_to_image_recall@{k}"])
    assert 0 < expected["text_to_image_recall@1"] < 1  # the data is neither trivial nor hopeless


def test_retrieval_recall_metric_rejects_queries_without_a_relevant_candidate(retrieval_recall_metric):
    with pytest.raises(ValueError, match="no relevant candidate"):
        retrieval_recall_metric.compute(predictions=[[0.1, 0.9]], references=[[]])
