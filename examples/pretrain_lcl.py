"""Pre-train an LCL model with `LCLTrainer`: the main job.

With no arguments it pre-trains the tiny demo model (`hub_configs/lcl-tiny-demo`: ViT 4 × 128 on 16×16
digits, causal head 4 × 128, CLIP BPE, λ_con = 1.0 where the reference variants use 0.1) on scikit-learn's
handwritten digits, then evaluates the frozen
model on 500 held-out digits (zero-shot accuracy, linear-probe accuracy, image->text R@1), saves the
model, processor and model card to `outputs/lcl-tiny-demo` and prints a results table:

    lcl-pretrain                                            # = python -m examples.pretrain_lcl
    lcl-pretrain --max-steps 5 --eval-samples 50            # smoke run
    lcl-pretrain --generation-loss-weight 0                 # contrastive only (CLIP-like)
    lcl-pretrain --contrastive-loss-weight 0                # generation only
    lcl-pretrain --data interleaved                         # digits as interleaved documents (or both)
    lcl-pretrain --no-pack-sequences                        # run the causal transformer on every padded position
    lcl-pretrain --resume-from-checkpoint last              # continue from the newest complete checkpoint

Any config of `hub_configs/`, real data and every `TrainingArguments` option are accepted:

    torchrun --nproc_per_node 8 -m examples.pretrain_lcl --config lcl-vit-b-32-mmc4 \
        --mmc4 'mmc4/docs_*.jsonl.zip' --mmc4-images mmc4/images --per-device-train-batch-size 128 \
        --max-steps 100000 --learning-rate 5e-4 --output-dir outputs/lcl-b32-mmc4 --bf16 --push-to-hub
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult
from torch.utils.data import ConcatDataset
from transformers import HfArgumentParser, set_seed

from examples.digits import (
    DIGIT_NAMES,
    ZERO_SHOT_TEMPLATES,
    DigitSplit,
    digit_training_data,
    held_out_captions,
    load_digit_split,
)
from modeling_lcl import LCLConfig, LCLForPreTraining
from modeling_lcl.evaluation_lcl import (
    build_zero_shot_classifier,
    encode_images,
    encode_texts,
    extract_image_features,
    linear_probe,
    recall_at_k,
    zero_shot_logits,
)
from modeling_lcl.trainer_lcl import LCLTrainer, LCLTrainingArguments
from processing import (
    LCLDataCollator,
    LCLImageProcessor,
    LCLProcessor,
    LCLTokenizer,
    build_clip_tokenizer,
    load_image_folder_pairs,
    load_mmc4,
    load_obelics,
    load_webdataset_pairs,
)

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"

# The demo recipe: what `TrainingArguments` defaults to here unless given on the command line.
DEMO_TRAINING_DEFAULTS = {
    "output_dir": "outputs/lcl-tiny-demo",
    "max_steps": 300,
    "per_device_train_batch_size": 64,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,  # a fraction of max_steps: warm up, then anneal (one cycle)
    "weight_decay": 0.1,
    "adam_beta2": 0.98,
    "logging_steps": 25,
    "save_steps": 100,
    "save_total_limit": 1,
    "seed": 0,
    "report_to": "none",
    "remove_unused_columns": False,
    "dataloader_num_workers": 0,
}


@dataclass
class ScriptArguments:
    config: str = field(
        default="lcl-tiny-demo",
        metadata={"help": "A folder name of hub_configs/, or a path to a folder with config.json or to a config.json."},
    )
    data: str = field(
        default="paired",
        metadata={"help": "Digits as 'paired' captions, 'interleaved' documents or 'both' (when no data path is given)."},
    )
    pairs: list[str] | None = field(
        default=None, metadata={"help": "Image-caption pairs: an imagefolder with metadata.jsonl, or webdataset .tar shards."}
    )
    mmc4: list[str] | None = field(default=None, metadata={"help": "MMC4 .jsonl / .jsonl.zip shards (paths or globs)."})
    mmc4_images: str | None = field(default=None, metadata={"help": "The MMC4 image folder."})
    obelics: list[str] | None = field(default=None, metadata={"help": "OBELICS parquet / jsonl files (paths or globs)."})
    obelics_images: str | None = field(default=None, metadata={"help": "Folder that OBELICS image paths are relative to."})
    image_first_prob: float = field(
        default=0.5, metadata={"help": "Probability that a pair is laid out image first (captioning only)."}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "A saved LCL tokenizer folder; default: the CLIP BPE tokenizer (built once)."}
    )
    eval_samples: int = field(
        default=500, metadata={"help": "Held-out digits for the evaluation (also kept out of digit training); 0: none."}
    )


def parse_args(argv=None) -> tuple[ScriptArguments, LCLTrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, LCLTrainingArguments))
    defaults = dict(DEMO_TRAINING_DEFAULTS)
    if torch.cuda.is_available():
        defaults["bf16"] = torch.cuda.is_bf16_supported()  # mixed precision where the device has it
    else:
        defaults["dataloader_pin_memory"] = False  # float32 on CPUs, nothing to pin for
    parser.set_defaults(**defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.data not in ("paired", "interleaved", "both"):
        raise ValueError(f"--data must be 'paired', 'interleaved' or 'both', got {script_args.data!r}.")
    return script_args, training_args


def load_config(name_or_path: str) -> LCLConfig:
    path = Path(name_or_path)
    if not path.exists():
        path = HUB_CONFIGS / name_or_path
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No config at {name_or_path!r} (nor in {HUB_CONFIGS}).")
    return LCLConfig.from_json_file(str(path))


def build_processor(config: LCLConfig, tokenizer_path: str | None, image_first_prob: float) -> LCLProcessor:
    tokenizer = LCLTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else build_clip_tokenizer()
    size = config.vision_config.image_size
    processor = LCLProcessor(
        image_processor=LCLImageProcessor(size=size, crop_size=size),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        max_length=config.text_config.max_position_embeddings,
        image_first_prob=image_first_prob,
    )
    mismatched = {k: (v, getattr(config, k)) for k, v in processor.special_token_ids().items() if getattr(config, k) != v}
    if mismatched or len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer does not match the model config: special ids (tokenizer, config) {mismatched}, "
            f"tokenizer size {len(tokenizer)} vs vocab_size {config.vocab_size}."
        )
    return processor


def training_data(args: ScriptArguments, split, seed: int):
    """The training examples and the dataset names for the model card."""
    sources, names = [], []
    # Every reader decides its examples' random choices (pair layouts, MMC4 image choices and layouts) per
    # (seed, epoch, row), so that a run resumed from a checkpoint repeats the interrupted one.
    layout = dict(image_first_prob=args.image_first_prob, seed=seed)
    for path in args.pairs or ():
        if Path(path).is_dir():
            sources.append(load_image_folder_pairs(path, **layout))
        else:
            sources.append(load_webdataset_pairs(path, streaming=False, **layout))
        names.append(Path(path).name)
    if args.mmc4:
        sources.append(load_mmc4(args.mmc4, image_dir=args.mmc4_images, **layout))
        names.append("mmc4")
    if args.obelics:
        sources.append(load_obelics(args.obelics, image_dir=args.obelics_images))
        names.append("obelics")
    if not sources:
        if split is None:
            raise ValueError("Training on the digits needs --eval-samples > 0 (the held-out split is kept out).")
        data = digit_training_data(split, args.data, seed, image_first_prob=args.image_first_prob)
        return data, ["scikit-learn digits (UCI optdigits)"]
    return (sources[0] if len(sources) == 1 else ConcatDataset(sources)), names


# ----------------------------------------------------------------------------------------------
# Evaluation on the held-out digits
# ----------------------------------------------------------------------------------------------


def _pixel_values(processor: LCLProcessor, images, batch_size: int = 256) -> torch.Tensor:
    chunks = [processor(images=images[i : i + batch_size])["pixel_values"] for i in range(0, len(images), batch_size)]
    return torch.cat([torch.as_tensor(chunk) for chunk in chunks])


@torch.no_grad()
def evaluate_digits(model: LCLForPreTraining, processor: LCLProcessor, split) -> dict[str, float]:
    """Zero-shot accuracy, linear-probe accuracy and image->text R@1 of the frozen model on held-out digits.

    - zero-shot: prompt-ensembled class embeddings (`ZERO_SHOT_TEMPLATES`, `<eot>` read as `<soi>`) against the
      images' pooled latents;
    - linear probe: logistic regression on the pooled latents of the training digits, C picked on a
      validation part of them;
    - image->text R@1: each held-out image against one caption per held-out image (templates in turn); a
      caption naming the image's digit is a correct answer, since captions of one digit are interchangeable.
    """
    lcl = model.lcl.eval()
    tokenizer = processor.tokenizer
    eval_pixels = _pixel_values(processor, split.eval_images)
    eval_labels = torch.as_tensor(split.eval_labels)

    classifier = build_zero_shot_classifier(lcl, tokenizer, DIGIT_NAMES, ZERO_SHOT_TEMPLATES)
    zero_shot = (zero_shot_logits(lcl, eval_pixels, classifier).argmax(-1) == eval_labels).float().mean().item()

    train_features = extract_image_features(lcl, _pixel_values(processor, split.train_images))
    eval_features = extract_image_features(lcl, eval_pixels)
    probe = linear_probe(train_features, split.train_labels, eval_features, split.eval_labels)

    # Identical captions (same digit, same template) are one candidate.
    caption_labels = dict(zip(held_out_captions(split.eval_labels), split.eval_labels.tolist()))
    captions = sorted(caption_labels)
    scores = encode_images(lcl, eval_pixels) @ encode_texts(lcl, tokenizer, captions).T
    caption_labels = torch.as_tensor([caption_labels[caption] for caption in captions])
    recall = recall_at_k(scores, eval_labels[:, None] == caption_labels[None, :], k_values=(1,))
    return {
        "zero_shot_accuracy": zero_shot,
        "linear_probe_accuracy": probe.accuracy,
        "image_to_text_recall@1": recall[1],
    }


def eval_results_for_card(metrics: dict[str, float], num_eval: int) -> list[EvalResult]:
    dataset = dict(dataset_type="sklearn-digits", dataset_name=f"scikit-learn digits, {num_eval} held out")
    tasks = {
        "zero_shot_accuracy": ("zero-shot-image-classification", "accuracy", "zero-shot accuracy"),
        "linear_probe_accuracy": ("image-classification", "accuracy", "linear-probe accuracy"),
        "image_to_text_recall@1": ("image-to-text", "recall", "image-to-text R@1"),
    }
    return [
        EvalResult(task_type=task, metric_type=metric, metric_name=name, metric_value=metrics[key], **dataset)
        for key, (task, metric, name) in tasks.items()
        if key in metrics
    ]


def results_table(rows: dict[str, float]) -> str:
    width = max(len(name) for name in rows)
    lines = [f"| {'metric':<{width}} | value  |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {name:<{width}} | {value:6.4f} |" for name, value in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What `run` trains and evaluates."""

    trainer: LCLTrainer
    processor: LCLProcessor
    split: DigitSplit | None
    dataset_names: list[str]


def build_job(script_args: ScriptArguments, training_args: LCLTrainingArguments, callbacks=None) -> Job:
    """The model, data, collator and trainer of a run (seeded), before training."""
    set_seed(training_args.seed)
    config = load_config(script_args.config)
    processor = build_processor(config, script_args.tokenizer, script_args.image_first_prob)
    split = load_digit_split(script_args.eval_samples, seed=training_args.seed) if script_args.eval_samples else None
    train_dataset, dataset_names = training_data(script_args, split, training_args.seed)
    trainer = LCLTrainer(
        model=LCLForPreTraining(config),
        args=training_args,
        train_dataset=train_dataset,
        data_collator=LCLDataCollator(processor, seed=training_args.seed),
        processing_class=processor,
        callbacks=callbacks,
    )
    return Job(trainer, processor, split, dataset_names)


def run(argv=None, callbacks=None) -> dict[str, float]:
    """The whole job; returns the evaluation metrics (empty without held-out digits, or off rank 0)."""
    script_args, training_args = parse_args(argv)
    job = build_job(script_args, training_args, callbacks)
    trainer, processor, split, dataset_names = job.trainer, job.processor, job.split, job.dataset_names
    resume = training_args.resume_from_checkpoint
    train_output = trainer.train(resume_from_checkpoint=True if resume == "last" else resume)

    metrics = {}
    if split is not None and trainer.is_world_process_zero():
        metrics = evaluate_digits(trainer.model, processor, split)
    trainer.save_model()
    card_kwargs = dict(
        model_name=Path(training_args.output_dir).name,
        datasets=dataset_names,
        eval_results=eval_results_for_card(metrics, script_args.eval_samples),
    )
    trainer.create_model_card(**card_kwargs)
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)

    if trainer.is_world_process_zero():
        final = trainer.final_training_metrics()
        rows = {**metrics, **{k: final[k] for k in ("loss_contrastive", "loss_generation") if k in final}}
        steps, runtime = trainer.state.global_step, train_output.metrics.get("train_runtime", math.nan)
        rows["train_steps_per_second"] = steps / runtime if runtime else math.nan
        results_path = Path(training_args.output_dir) / "eval_results.json"
        results_path.write_text(json.dumps({**rows, "steps": steps, "train_runtime": runtime}, indent=2) + "\n")
        print(f"\nLCL pre-training: {steps} steps in {runtime:.0f} s; saved to {training_args.output_dir}\n")
        print(results_table(rows))
    return metrics


def main(argv=None) -> None:
    """Console-script entry point (`lcl-pretrain`)."""
    run(argv)


if __name__ == "__main__":
    main()
