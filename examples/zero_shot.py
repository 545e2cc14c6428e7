"""Zero-shot classification and image-text retrieval with a trained LCL model, on scikit-learn's digits.

    python examples/zero_shot.py --model outputs/lcl-tiny-demo

Runs offline: the model folder holds the model and its processor (as the main job saves them), the data
ships with scikit-learn (the main job's held-out split, `examples/digits.py`) and the metrics are the
local `evaluate` modules in `metrics/`. Prints:

    zero-shot top1_accuracy: ...                 (and top5, mean per-class recall)
    retrieval image_to_text_recall@1: ...        (and @5, @10, and text_to_image_*)
    pipeline: ...                                (transformers' zero-shot-image-classification pipeline)

Retrieval pairs every held-out image with a caption (the training templates in turn); a caption is
relevant to every image of the digit it names, as captions of one digit are interchangeable.
"""

import argparse
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import AutoModel, AutoProcessor, pipeline

import modeling_lcl  # noqa: F401  (registers "lcl" with the Auto classes)
import processing  # noqa: F401  (registers the LCL tokenizer, image processor and processor)
from examples.digits import DIGIT_NAMES, ZERO_SHOT_TEMPLATES, held_out_captions, load_digit_split
from modeling_lcl.evaluation_lcl import build_zero_shot_classifier, encode_images, encode_texts, zero_shot_logits

METRICS = Path(__file__).resolve().parents[1] / "metrics"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder with a trained LCL model and its processor")
    parser.add_argument("--eval-samples", type=int, default=500,
                        help="size of the main job's held-out split (its --eval-samples): these digits are evaluated")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate on the first N held-out digits")
    parser.add_argument("--templates", nargs="+", default=list(ZERO_SHOT_TEMPLATES), help="prompt templates with {}")
    parser.add_argument("--class-names", nargs=10, default=list(DIGIT_NAMES), help="the ten class names")
    parser.add_argument("--batch-size", type=int, default=256)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    split = load_digit_split(args.eval_samples)
    images, labels = split.eval_images[: args.max_samples], split.eval_labels[: args.max_samples]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]

    # Zero-shot classification: one prompt-ensembled text embedding per class.
    class_embeds = build_zero_shot_classifier(model, processor.tokenizer, args.class_names, args.templates)
    logits = zero_shot_logits(model, pixel_values, class_embeds, args.batch_size)
    accuracy = evaluate.load(str(METRICS / "zero_shot_accuracy"))
    results = accuracy.compute(predictions=logits.numpy(), references=labels, k_values=[1, 5])
    for name, value in results.items():
        print(f"zero-shot {name}: {value:.4f}")

    # Retrieval: one caption per image; relevant = naming the same digit, in both directions.
    captions = held_out_captions(labels)
    image_embeds = encode_images(model, pixel_values, args.batch_size)
    scores = (image_embeds @ encode_texts(model, processor.tokenizer, captions, args.batch_size).T).numpy()
    same_digit = [np.flatnonzero(labels == label).tolist() for label in labels]
    recall = evaluate.load(str(METRICS / "retrieval_recall"))
    for direction, direction_scores in (("image_to_text", scores), ("text_to_image", scores.T)):
        values = recall.compute(predictions=direction_scores, references=same_digit, k_values=[1, 5, 10])
        for name, value in values.items():
            results[f"{direction}_{name}"] = value
            print(f"retrieval {direction}_{name}: {value:.4f}")

    # The same model in transformers' own pipeline, unchanged.
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)
    top = classifier(images[0], candidate_labels=list(args.class_names), hypothesis_template=args.templates[0])[0]
    print(f"pipeline: first held-out image (a {args.class_names[labels[0]]}) -> {top['label']} ({top['score']:.3f})")
    return results


if __name__ == "__main__":
    main()
