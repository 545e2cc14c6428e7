"""Recall@K for retrieval: the image->text and text->image metric of CLIP-style models.

A local `evaluate` module, loaded from its folder (no Hub access):

    import evaluate
    metric = evaluate.load("/path/to/metrics/retrieval_recall")
    metric.compute(predictions=image_text_scores, references=captions_of_each_image, k_values=[1, 5, 10])

Self-contained on purpose (numpy + evaluate only): `evaluate` copies this file into its module cache.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Recall@K of a retrieval task: the fraction of queries with at least one relevant candidate among their
K best-scored candidates. A query's rank is the number of irrelevant candidates scoring at least as high
as its best relevant one (ties count against the query, so a constant scorer gets no credit). Call it once
per direction: rows of image->text scores with each image's captions as references, then rows of
text->image scores with each caption's image.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row of candidate scores per query, all rows of the same
        length (number of candidates), e.g. rows of `logits_per_image`.
    references (`list` of `list` of `int`): for each query, the indices of its relevant candidates (at least
        one), e.g. the captions of an image, or `[i]` for the one image of caption i.
    k_values (`list` of `int`, defaults to `[1, 5, 10]`): the K of each recall.
Returns:
    `recall@{K}` for each K, in [0, 1].
Examples:
    >>> metric = evaluate.load("metrics/retrieval_recall")
    >>> metric.compute(predictions=[[0.9, 0.1, 0.0], [0.9, 0.5, 0.1]], references=[[0], [2]], k_values=[1, 3])
    {'recall@1': 0.5, 'recall@3': 1.0}
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
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        scores = np.asarray(predictions, dtype=np.float64)
        if scores.ndim != 2:
            raise ValueError("predictions must be rows of candidate scores of one length (number of candidates).")
        num_queries, num_candidates = scores.shape
        relevant = np.zeros_like(scores, dtype=bool)
        for query, candidates in enumerate(references):
            candidates = np.asarray(candidates, dtype=np.int64)
            if candidates.size == 0:
                raise ValueError(f"Query {query} has no relevant candidate in references.")
            if candidates.min() < 0 or candidates.max() >= num_candidates:
                raise ValueError(f"references of query {query} must be candidate indices in [0, {num_candidates}).")
            relevant[query, candidates] = True
        if any(int(k) < 1 for k in k_values):
            raise ValueError(f"k_values must be positive, got {list(k_values)}.")
        best_relevant = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
        rank = ((scores >= best_relevant) & ~relevant).sum(axis=1)
        return {f"recall@{int(k)}": float((rank < int(k)).mean()) for k in k_values}
