"""Scale-out estimate on paper: B/16 LAION at a global batch of 32k on 8 / 64 / 256 GPUs.

    python benchmarks/scale_plan.py                      # analytical FLOPs, assumed MFU 0.40
    python benchmarks/scale_plan.py --measure-flops      # + cross-check the count with torch's FlopCounterMode
    python benchmarks/scale_plan.py --mfu 0.45           # e.g. the MFU gpu_step.py measured

Step time = FLOPs of the global batch / (GPUs x dense bf16 peak x MFU), plus whatever gradient
all-reduce does not hide behind the backward pass. Memory per GPU = weights, gradients and AdamW state
in fp32 (16 bytes per parameter, DDP) + activations of one micro-batch + one chunk of lm_head logits
(chunked cross-entropy; the column `unchunked_logits_gib` is what the logits would take built at once).
Every input of the estimate is printed and written to JSON; the published figures used are in `GPUS` and `LINKS`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import RESULTS_DIR, format_table, lcl_config, write_json  # noqa: E402
from flops import StepShape, training_step_flops  # noqa: E402

# Published figures (vendor datasheets): dense bf16 TFLOP/s and memory GiB.
GPUS = {
    "H100 SXM 80GB": {"bf16_tflops": 989.4, "memory_gib": 80},
    "H200 141GB": {"bf16_tflops": 989.4, "memory_gib": 141},
}
# Per-GPU bandwidth (GB/s, one direction): NVLink 4 inside an 8-GPU node, one 400 Gb/s NDR InfiniBand
# adapter per GPU between nodes.
LINKS = {"nvlink_gb_s": 450.0, "infiniband_gb_s": 50.0}
GPUS_PER_NODE = 8
CE_CHUNK = 4096  # targets per chunk of the generation loss (see the README's proposed chunked cross-entropy)


def activation_bytes_per_sample(config, text_len: int, grad_checkpointing: bool) -> float:
    """Activations kept for backward, per sample, bf16 with flash attention (the lm_head logits apart).

    Korthikanti et al. (2022): a transformer layer keeps about 34·s·h bytes in 16-bit without the
    attention matrix (flash attention never stores it); with activation checkpointing only the layer
    input, 2·s·h bytes, is kept, plus the 34·s·h of the one layer being recomputed.
    """
    vision, text = config.vision_config, config.text_config
    vision_tokens = config.num_image_tokens + 1
    vision_layer = vision_tokens * vision.hidden_size
    text_layer = text_len * text.hidden_size
    if not grad_checkpointing:
        return 34 * (vision_layer * vision.num_hidden_layers + text_layer * text.num_hidden_layers)
    return 2 * (vision_layer * vision.num_hidden_layers + text_layer * text.num_hidden_layers) + 34 * max(
        vision_layer, text_layer)


def logits_bytes(config, num_targets: int) -> float:
    """lm_head on `num_targets` positions: bf16 logits, their fp32 copy, fp32 log-softmax (10 B per entry)."""
    return 10 * num_targets * config.text_config.vocab_size


def num_parameters(config) -> int:
    """Parameters of `LCLForPreTraining(config)`, counted on a model built on the meta device (no memory)."""
    import torch

    from modeling_lcl import LCLForPreTraining

    with torch.device("meta"):
        model = LCLForPreTraining(config)
    return sum(p.numel() for p in model.parameters())


def measured_flops_per_sample(config, text_len: int, caption_tokens: int) -> float:
    """FLOPs of forward + backward of one text-first pair right-padded to `text_len`, counted by torch's
    FlopCounterMode on CPU (fp32). It does not count the CPU SDPA kernels (the attention-score terms)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_lcl import LCLForPreTraining

    n = config.num_image_tokens
    ids = [config.bos_token_id] + list(range(1, caption_tokens + 1)) + [config.image_start_token_id]
    ids += [config.image_token_id] * n + [config.image_end_token_id]
    mask = [1] * len(ids) + [0] * (text_len - len(ids))
    ids += [config.pad_token_id] * (text_len - len(ids))
    model = LCLForPreTraining(config).train()
    size = config.vision_config.image_size
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.tensor([mask]),
              "pixel_values": torch.randn(1, 3, size, size)}
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    return counter.get_total_flops()


def pair_prefix_lengths(config, caption_tokens: int) -> dict[str, int]:
    """Tokens the causal transformer runs on per pair with packed prefixes (`pack_sequences=True`): an
    image-first pair `<soi> <img>xN <eoi> caption <eot>` without its final `<eot>`, a text-first pair
    `<sot> caption <soi>` without the image block after its `<soi>`."""
    return {"image_first": config.num_image_tokens + 2 + caption_tokens, "text_first": caption_tokens + 2}


def packed_slots_per_sample(config, batch_size: int = 512, seed: int = 0) -> float:
    """Token slots per pair in the rows `plan_packing` builds, on a sampled micro-batch of `batch_size` pairs
    (caption lengths as in `train_step.py`: log-normal, median 12, sigma 0.6; half of the pairs image first).

    Rows are no longer than the longest prefix, so the ~212-token image-first prefixes share a row with text-first
    ones only: the rows hold the prefixes plus unused slots, which the linear layers still compute."""
    import random

    from train_step import sample_caption_lengths

    from modeling_lcl.packing_lcl import plan_packing

    context = config.text_config.max_position_embeddings
    captions = sample_caption_lengths(random.Random(seed), batch_size, context - config.num_image_tokens - 4)
    prefixes = [pair_prefix_lengths(config, c)["image_first" if i % 2 == 0 else "text_first"]
                for i, c in enumerate(captions)]
    rows, row_length = plan_packing(prefixes, context).packed_shape
    return rows * row_length / batch_size


def flops_per_sample(config, layout: str, text_len: float, caption_tokens: int) -> dict:
    """`training_step_flops` of one pair: padded to `text_len`, or packed into rows of `text_len` slots per pair
    (each layout on its own prefix, attention per segment as varlen flash attention computes it, plus the linear
    layers on the unused slots)."""
    targets = caption_tokens + 1  # the caption and <soi> (text first) or <eot> (image first)
    if layout == "padded":
        return training_step_flops(config, StepShape(1, 1, int(text_len), targets, 1))
    prefixes = pair_prefix_lengths(config, caption_tokens)
    image_first = training_step_flops(config, StepShape(1, 1, prefixes["image_first"], targets, 0))
    text_first = training_step_flops(config, StepShape(1, 1, prefixes["text_first"], targets, 1))
    terms = {name: (value + text_first["forward_terms"][name]) / 2 for name, value in image_first["forward_terms"].items()}
    one_token = training_step_flops(config, StepShape(1, 1, 1, 0, 0))["forward_terms"]
    per_token_linear = sum(one_token[name] for name in ("text_qkv_proj", "text_out_proj", "text_mlp"))
    terms["text_unused_slots"] = (text_len - sum(prefixes.values()) / 2) * per_token_linear
    return {"forward_terms": terms, "total": 3 * sum(terms.values()) - terms["vit_patch_embedding"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="b16-laion")
    parser.add_argument("--global-batch", type=int, default=32768)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--mfu", type=float, default=0.40,
                        help="assumed model FLOPs utilisation (gpu_step.py measures it)")
    parser.add_argument("--layout", choices=["packed", "padded"], default="packed",
                        help="packed: the prefixes the loss reads, packed (what LCLTrainer runs); padded: every "
                             "pair padded to --text-len")
    parser.add_argument("--text-len", type=int, default=None,
                        help="padded layout: sequence length the causal transformer runs on (default: the context "
                             "length, which dynamic padding reaches anyway in micro-batches of hundreds of captions)")
    parser.add_argument("--caption-tokens", type=int, default=14,
                        help="mean caption length in BPE tokens (log-normal, median 12, sigma 0.6: mean 14)")
    parser.add_argument("--measure-flops", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    config = lcl_config(args.variant)
    padded_len = args.text_len or config.text_config.max_position_embeddings
    # Half the pairs image-first, half text-first (a contrastive pair), ~14 generation targets of text each.
    targets_per_sample = args.caption_tokens + 1  # the caption and <soi> (text first) or <eot> (image first)
    text_len = padded_len if args.layout == "padded" else packed_slots_per_sample(config)
    flops = flops_per_sample(config, args.layout, text_len, args.caption_tokens)
    per_sample = flops["total"]
    prefixes = pair_prefix_lengths(config, args.caption_tokens)
    checked = measured_flops_per_sample(config, padded_len, args.caption_tokens) if args.measure_flops else None
    attention = sum(value for name, value in flops["forward_terms"].items() if "attn_scores" in name) * 3
    params = num_parameters(config)
    rows = []
    for gpu_name, gpu in GPUS.items():
        for gpus in args.gpus:
            per_gpu = args.global_batch // gpus
            compute_s = per_sample * per_gpu / (gpu["bf16_tflops"] * 1e12 * args.mfu)
            # Ring all-reduce of fp32 gradients: each GPU sends and receives 2 (n-1)/n of the buffer.
            link = LINKS["nvlink_gb_s"] if gpus <= GPUS_PER_NODE else LINKS["infiniband_gb_s"]
            allreduce_s = 2 * (gpus - 1) / gpus * 4 * params / (link * 1e9)
            backward_s = compute_s * 2 / 3
            exposed_s = max(0.0, allreduce_s - backward_s)  # DDP overlaps buckets with the backward pass
            state_gib = 16 * params / 2**30
            # 10% + 2 GiB for the allocator and the CUDA context; with chunked cross-entropy (4096 targets
            # at a time) the logits take a fixed ~2 GiB instead of growing with the batch.
            free_gib = gpu["memory_gib"] * 0.9 - state_gib - 2 - logits_bytes(config, CE_CHUNK) / 2**30
            plain = activation_bytes_per_sample(config, text_len, False) / 2**30
            ckpt = activation_bytes_per_sample(config, text_len, True) / 2**30
            fits_plain = int(free_gib // plain)
            micro = min(per_gpu, fits_plain)
            checkpointing = micro < per_gpu and int(free_gib // ckpt) >= per_gpu
            if checkpointing:  # recompute the forward once: 4/3 of the compute, no accumulation
                micro, compute_s = per_gpu, compute_s * 4 / 3
            rows.append({
                "gpu": gpu_name, "gpus": gpus, "per_gpu_batch": per_gpu, "micro_batch": micro,
                "accumulation": -(-per_gpu // micro), "grad_ckpt": checkpointing,
                "compute_s": compute_s, "allreduce_s": allreduce_s, "step_s": compute_s + exposed_s,
                "images_per_s": args.global_batch / (compute_s + exposed_s),
                "memory_gib": (state_gib + micro * (ckpt if checkpointing else plain)
                               + logits_bytes(config, CE_CHUNK) / 2**30),
                "unchunked_logits_gib": logits_bytes(config, micro * targets_per_sample) / 2**30,
            })
    inputs = {
        "variant": args.variant, "global_batch": args.global_batch, "layout": args.layout,
        "text_tokens_per_sample": text_len, "packed_prefixes": prefixes if args.layout == "packed" else None,
        "mfu": args.mfu,
        "parameters": params, "train_flops_per_sample": per_sample, "flop_counter_per_sample": checked,
        "attention_score_flops_per_sample": attention,
        "activation_gib_per_sample": {"plain": activation_bytes_per_sample(config, text_len, False) / 2**30,
                                      "grad_ckpt": activation_bytes_per_sample(config, text_len, True) / 2**30},
        "gpus": GPUS, "links": LINKS,
    }
    layout = (f"packed prefixes: {prefixes['image_first']} tokens image first, {prefixes['text_first']} text first, "
              f"{text_len:.0f} token slots per pair in the packed rows" if args.layout == "packed"
              else f"padded to {padded_len}")
    print(f"{args.variant}: {params / 1e6:.0f}M parameters, {per_sample / 1e9:.0f} GFLOP per sample "
          f"(fwd + bwd, {layout})")
    if checked:
        padded = training_step_flops(config, StepShape(1, 1, padded_len, targets_per_sample, 1))
        padded_attention = sum(v for name, v in padded["forward_terms"].items() if "attn_scores" in name) * 3
        print(f"check of the count, one text-first pair padded to {padded_len}: FlopCounterMode {checked / 1e9:.1f} "
              f"GFLOP, ours without the attention-score terms it does not count on CPU "
              f"{(padded['total'] - padded_attention) / 1e9:.1f}")
    print(f"assumed MFU {args.mfu}; global batch {args.global_batch}\n")
    table = format_table(rows, list(rows[0]))
    print(table)
    output = Path(args.output) if args.output else RESULTS_DIR / f"scale_plan_{args.variant}.json"
    print(f"\nwrote {write_json({'benchmark': 'scale_plan', 'inputs': inputs, 'rows': rows, 'table': table}, output)}")


if __name__ == "__main__":
    main()
