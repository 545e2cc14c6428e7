"""Captioning with a trained LCL model (`LCLForConditionalGeneration.generate`), on scikit-learn's digits.

    python examples/caption.py --model outputs/lcl-tiny-demo --num-beams 3

Captions the main job's held-out digits (`examples/digits.py`). The prompt is the image-first layout
LCL was trained on, `<soi> <img>×N <eoi>`, optionally followed by a
text prefix (`--prefix "a photo of"`); generation continues until `<eot>`, with a KV cache. Runs offline.
Prints a few captions, then

    caption greedy class_accuracy: ...   (the caption names the right digit, and no other)
    caption beam class_accuracy: ...
    reference caption perplexity: ...    (of `--caption-template` captions given their images)
"""

import argparse
import math
import re

import torch
from transformers import AutoProcessor

import modeling_lcl  # noqa: F401  (registers "lcl" with the Auto classes)
import processing  # noqa: F401  (registers the LCL processor)
from modeling_lcl.modeling_lcl_tasks import LCLForConditionalGeneration
from examples.digits import CAPTION_TEMPLATES, DIGIT_NAMES, describe, load_digit_split


def caption_prompts(processor, num_images: int, prefix: str) -> torch.Tensor:
    """`(num_images, prompt_length)` ids: one image block per image, then the tokenised prefix (no `<eot>`)."""
    ids = processor.special_token_ids()
    block = [ids["image_start_token_id"]] + [ids["image_token_id"]] * processor.num_image_tokens
    block.append(ids["image_end_token_id"])
    prefix_ids = processor.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    return torch.tensor([block + prefix_ids] * num_images)


def decode_captions(tokenizer, new_tokens: torch.Tensor, eos_token_id: int) -> list[str]:
    """Text of each row of generated ids up to its first `<eot>` (finished rows are padded after it)."""
    rows = []
    for row in new_tokens.tolist():
        rows.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def named_classes(caption: str) -> set[int]:
    """Digits a caption names, as a word ("three") or a numeral ("3")."""
    words = set(re.findall(r"[a-z]+|\d", caption.lower()))
    return {digit for digit, name in enumerate(DIGIT_NAMES) if name in words or str(digit) in words}


def class_accuracy(captions: list[str], labels) -> float:
    return sum(named_classes(c) == {int(y)} for c, y in zip(captions, labels)) / len(captions)


@torch.no_grad()
def reference_perplexity(model, processor, images, captions: list[str]) -> float:
    """exp(mean next-token loss) of the captions and their `<eot>`, each after its image block."""
    batch = processor(images=images, text=captions, image_first_prob=1.0)
    ids = processor.special_token_ids()
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    image_block = torch.isin(
        input_ids, torch.tensor([ids["image_start_token_id"], ids["image_token_id"], ids["image_end_token_id"]])
    )
    labels = input_ids.masked_fill(image_block | ~attention_mask.bool(), -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=batch["pixel_values"], labels=labels)
    return math.exp(out.loss.item())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder with a trained LCL model and its processor")
    parser.add_argument("--eval-samples", type=int, default=500,
                        help="size of the main job's held-out split (its --eval-samples): these digits are evaluated")
    parser.add_argument("--num-images", type=int, default=50, help="caption the first N held-out digits")
    parser.add_argument("--prefix", default="", help="text the captions must start with")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--caption-template", default=CAPTION_TEMPLATES[0],
                        help="reference captions for the perplexity, with {name} (word) or {digit} (numeral)")
    parser.add_argument("--show", type=int, default=5, help="print this many captions")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(args.model)
    model = LCLForConditionalGeneration.from_pretrained(args.model).eval()
    split = load_digit_split(args.eval_samples)
    images, labels = split.eval_images[: args.num_images], split.eval_labels[: args.num_images]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    input_ids = caption_prompts(processor, len(images), args.prefix)
    prompt_length = input_ids.shape[1]

    results = {}
    for name, decoding in (("greedy", {"do_sample": False}), ("beam", {"num_beams": args.num_beams})):
        # use_cache: a checkpoint saved during training may carry use_cache=False in its config.
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=args.max_new_tokens,
                                   use_cache=True, **decoding)
        captions = decode_captions(processor.tokenizer, generated[:, prompt_length:], model.config.eos_token_id)
        captions = [f"{args.prefix} {c}".strip() for c in captions]
        for caption, label in list(zip(captions, labels))[: args.show]:
            print(f"{name} | digit {DIGIT_NAMES[label]:<5} | {caption}")
        results[f"{name}_class_accuracy"] = class_accuracy(captions, labels)
        print(f"caption {name} class_accuracy: {results[f'{name}_class_accuracy']:.4f}")

    references = [describe(args.caption_template, int(y)) for y in labels]
    results["reference_perplexity"] = reference_perplexity(model, processor, images, references)
    print(f"reference caption perplexity: {results['reference_perplexity']:.3f}")
    return results


if __name__ == "__main__":
    main()
