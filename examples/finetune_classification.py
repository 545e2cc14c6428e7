"""Image classification on scikit-learn's digits with a trained LCL vision encoder: full fine-tuning, LoRA,
or a linear probe on frozen features.

    python examples/finetune_classification.py --model outputs/lcl-tiny-demo --mode full lora linear-probe

- `full`: `LCLForImageClassification` (the checkpoint's vision tower + a new linear head), every weight
  trained with the stock `Trainer`;
- `lora`: the same model with LoRA on the ViT's attention (PEFT) and a fully trained head; the adapter is
  saved, reloaded and merged, and the merged model is evaluated;
- `linear-probe`: logistic regression on frozen pooled features (`--probe torch` for a torch linear layer
  with early stopping).

Trains on the main job's training digits and evaluates on its held-out ones (`examples/digits.py`).
Runs offline (model folder + scikit-learn data + the local metric in `metrics/`). Prints one line per
mode: `<mode> top1_accuracy: ...`.
"""

import argparse
import tempfile
from pathlib import Path

import evaluate
import numpy as np
import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import TensorDataset
from transformers import AutoConfig, AutoModelForImageClassification, AutoProcessor, Trainer, TrainingArguments

import modeling_lcl  # noqa: F401  (registers "lcl" with the Auto classes)
import processing  # noqa: F401  (registers the LCL processor)
from modeling_lcl.evaluation_lcl import extract_image_features, linear_probe
from modeling_lcl.modeling_lcl_tasks import LCLForImageClassification
from modeling_lcl.peft_lcl import lcl_lora_config

from examples.digits import DIGIT_NAMES, load_digit_split

METRICS = Path(__file__).resolve().parents[1] / "metrics"
MODES = ("full", "lora", "linear-probe")


class DictDataset(TensorDataset):
    """`{"pixel_values", "labels"}` items, the names `LCLForImageClassification.forward` takes."""

    def __getitem__(self, index):
        pixel_values, labels = super().__getitem__(index)
        return {"pixel_values": pixel_values, "labels": labels}


def as_dataset(processor, images, labels) -> DictDataset:
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return DictDataset(pixel_values, torch.as_tensor(labels))


def accuracy_metric():
    metric = evaluate.load(str(METRICS / "zero_shot_accuracy"))  # top-K accuracy of any class scores

    def compute_metrics(eval_prediction):
        return metric.compute(predictions=eval_prediction.predictions, references=eval_prediction.label_ids,
                              k_values=[1, 5])

    return compute_metrics


def load_classifier(args) -> LCLForImageClassification:
    config = AutoConfig.from_pretrained(
        args.model,
        id2label=dict(enumerate(DIGIT_NAMES)),
        label2id={name: i for i, name in enumerate(DIGIT_NAMES)},
        classifier_pooling=args.pooling,
    )
    return AutoModelForImageClassification.from_pretrained(args.model, config=config)


def train(model, args, train_set, eval_set, output_dir: Path, learning_rate: float) -> Trainer:
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=learning_rate,
        warmup_steps=0.1,  # a fraction of the training steps
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                      compute_metrics=accuracy_metric())
    trainer.train()
    return trainer


def run_full(args, train_set, eval_set, work_dir: Path) -> dict:
    trainer = train(load_classifier(args), args, train_set, eval_set, work_dir / "full", args.learning_rate)
    return trainer.evaluate()


def run_lora(args, train_set, eval_set, work_dir: Path) -> dict:
    model = load_classifier(args)
    model.save_pretrained(work_dir / "lora-base")  # the base the adapter is reloaded onto (its head is new)
    peft_model = get_peft_model(model, lcl_lora_config(model, r=args.lora_rank, lora_alpha=2 * args.lora_rank))
    trainer = train(peft_model, args, train_set, eval_set, work_dir / "lora", args.lora_learning_rate)
    peft_model.save_pretrained(work_dir / "lora-adapter")
    # Reload base + adapter, merge the LoRA weights into the ViT, and evaluate the plain merged model.
    base = LCLForImageClassification.from_pretrained(work_dir / "lora-base")
    merged = PeftModel.from_pretrained(base, work_dir / "lora-adapter").merge_and_unload()
    trainer.model = merged
    return trainer.evaluate()


def run_linear_probe(args, train_set, eval_set) -> dict:
    encoder = load_classifier(args)
    train_x = extract_image_features(encoder, train_set.tensors[0], args.pooling)
    eval_x = extract_image_features(encoder, eval_set.tensors[0], args.pooling)
    result = linear_probe(train_x, train_set.tensors[1], eval_x, eval_set.tensors[1], method=args.probe, seed=args.seed)
    return {"eval_top1_accuracy": result.accuracy, "probe_hyperparameter": result.hyperparameter}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder with a trained LCL model and its processor")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["full"], help="one or more of " + ", ".join(MODES))
    parser.add_argument("--pooling", choices=("latent", "mean"), default="latent", help="image representation")
    parser.add_argument("--probe", choices=("logistic", "torch"), default="logistic", help="linear-probe method")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when positive")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-learning-rate", type=float, default=3e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=500,
                        help="size of the main job's held-out split (its --eval-samples): these digits are evaluated")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--output-dir", default=None, help="where runs and the LoRA adapter go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    processor = AutoProcessor.from_pretrained(args.model)
    split = load_digit_split(args.eval_samples)  # the main job's split (its default seed)
    train_set = as_dataset(processor, split.train_images[: args.max_train_samples],
                           split.train_labels[: args.max_train_samples])
    eval_set = as_dataset(processor, split.eval_images[: args.max_eval_samples],
                          split.eval_labels[: args.max_eval_samples])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.output_dir or tmp)
        for mode in args.mode:
            if mode == "full":
                metrics = run_full(args, train_set, eval_set, work_dir)
            elif mode == "lora":
                metrics = run_lora(args, train_set, eval_set, work_dir)
            else:
                metrics = run_linear_probe(args, train_set, eval_set)
            results[mode] = metrics
            print(f"{mode} top1_accuracy: {metrics['eval_top1_accuracy']:.4f}")
    return results


if __name__ == "__main__":
    main()
