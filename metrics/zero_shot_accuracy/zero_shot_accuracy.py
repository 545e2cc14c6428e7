"""Top-K accuracy and mean per-class recall from class scores: the zero-shot classification metric.

A local `evaluate` module, loaded from its folder (no Hub access):

    import evaluate
    metric = evaluate.load("/path/to/metrics/zero_shot_accuracy")
    metric.compute(predictions=logits_per_image, references=labels, k_values=[1, 5])

Self-contained on purpose (numpy + evaluate only): `evaluate` copies this file into its module cache.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-K accuracy of class scores: a sample counts as correct at K when fewer than K other classes score at
least as high as its true class (ties count against the sample, so a constant scorer gets no credit).
Also reports the mean per-class recall (top-1 accuracy averaged over classes), the headline metric of
imbalanced zero-shot benchmarks. The scores are, e.g., `logits_per_image` of an LCL / CLIP model against
one prompt-ensembled embedding per class; any classifier's logits work as well.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row of class scores per sample, all rows of the same length
        (number of classes).
    references (`list` of `int`): the true class of each sample, in [0, number of classes).
    k_values (`list` of `int`, defaults to `[1, 5]`): the K of each top-K accuracy.
Returns:
    `top{K}_accuracy` for each K and `mean_per_class_recall` (over the classes present in `references`),
    all in [0, 1].
Examples:
    >>> metric = evaluate.load("metrics/zero_shot_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], references=[1, 2], k_values=[1, 2])
    {'top1_accuracy': 0.5, 'top2_accuracy': 0.5, 'mean_per_class_recall': 0.5}
"""

_CITATION = """
@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle={ICML},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5)):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2:
            raise ValueError("predictions must be rows of class scores of one length (number of classes).")
        num_classes = scores.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"references must be class indices in [0, {num_classes}).")
        if any(int(k) < 1 for k in k_values):
            raise ValueError(f"k_values must be positive, got {list(k_values)}.")
        true_scores = scores[np.arange(len(labels)), labels]
        # Rank of the true class: the other classes scoring at least as high (the true class itself excluded).
        rank = (scores >= true_scores[:, None]).sum(axis=1) - 1
        results = {f"top{int(k)}_accuracy": float((rank < int(k)).mean()) for k in k_values}
        top1_hit = rank == 0
        results["mean_per_class_recall"] = float(np.mean([top1_hit[labels == c].mean() for c in np.unique(labels)]))
        return results
