"""One-GPU training-step benchmark: bf16 autocast, SDPA (flash where the inputs allow), optional compile.

    python benchmarks/gpu_step.py                                  # B/16 LAION, batch 128, on cuda:0
    python benchmarks/gpu_step.py --batch-size 256 --compile --grad-checkpointing
    python benchmarks/gpu_step.py --device cpu --tiny              # smoke run of this script, no GPU

Measures what one rank of a data-parallel run does per micro-batch: forward + backward of
`LCLForPreTraining` under `torch.autocast(bfloat16)` with fp32 master weights (what Accelerate's
`mixed_precision="bf16"` does) and a fused AdamW step. Prints step time, images/s, peak GPU memory and
MFU = analytical model FLOPs (benchmarks/flops.py, matmuls only, no recompute) / step time / the
device's dense bf16 peak (a datasheet figure, or `--peak-tflops`), and also against a bf16 matmul peak
measured on the spot.

Attention: SDPA everywhere. The ViT and the pooler have no mask, so they get the flash kernel. The causal
transformer gets it only when `attention_mask` is all ones (`--layout full`: every sequence fills the
context, e.g. long captions); a padded batch carries a 4-D mask and SDPA picks the memory-efficient kernel
instead. `--layout packed` (the default, what `LCLTrainer` runs) packs the prefixes the loss reads
(`pack_sequences=True`); its block-diagonal mask also goes to the memory-efficient kernel under SDPA, and to
varlen flash attention with `--attn-implementation flash_attention_2` (the flash-attn package).
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    RESULTS_DIR,
    format_table,
    lcl_config,
    machine_info,
    matmul_peak_flops,
    median,
    spread,
    write_json,
)
from flops import format_flops, training_step_flops  # noqa: E402
from train_step import layout_inputs, make_optimizer, make_pair_batches, step_shape  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity).
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
}


def device_bf16_peak(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no datasheet peak for this device"
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12, f"datasheet, {key}"
    return None, f"unknown device {name!r}: pass --peak-tflops"


def fill_context(batch, config) -> None:
    """`--layout full`: replace the padding by more text, so that every sequence fills the context."""
    filler = torch.randint(1, config.bos_token_id, batch.padded_input_ids.shape,
                           generator=torch.Generator().manual_seed(1))
    batch.padded_input_ids = torch.where(batch.padded_attention_mask.bool(), batch.padded_input_ids, filler)
    batch.padded_attention_mask = torch.ones_like(batch.padded_attention_mask)


def make_inputs(args, config, device):
    batch = make_pair_batches(config, args.batch_size, 1, seed=args.seed)[0]
    if args.layout == "full":
        fill_context(batch, config)
    layout = "max_length" if args.layout == "full" else args.layout
    ids, mask = layout_inputs(batch, layout)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
              "pixel_values": batch.pixel_values.to(device), "pack_sequences": layout == "packed"}
    return inputs, step_shape(config, batch, layout)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="b16-laion")
    parser.add_argument("--tiny", action="store_true", help="tiny model (smoke run); same as --variant tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128, or 8 with --tiny")
    parser.add_argument("--layout", choices=["packed", "dynamic", "max_length", "full"], default="packed",
                        help="padding of the captions (see the module docstring)")
    parser.add_argument("--attn-implementation", default="sdpa", help="sdpa, eager, flash_attention_2, ...")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak, TFLOP/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.variant = "tiny"
    if args.batch_size is None:
        args.batch_size = 8 if args.variant == "tiny" else 128
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --tiny for a smoke run")

    from modeling_lcl import LCLForPreTraining

    info = machine_info()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    config = lcl_config(args.variant)
    torch.manual_seed(args.seed)
    model = LCLForPreTraining(config).to(device).train()
    model.set_attn_implementation(args.attn_implementation)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, "fused")
    forward = torch.compile(model) if args.compile else model
    inputs, shape = make_inputs(args, config, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = forward(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.lcl.logit_scale.clamp_(0, config.logit_scale_max)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    loss = float(loss.detach())
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    flops = training_step_flops(config, shape)
    step_s = median(times)
    achieved = flops["total"] / step_s
    datasheet_peak, peak_source = device_bf16_peak(device, args.peak_tflops)
    matmul_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    measured_peak = matmul_peak_flops(size=8192 if device.type == "cuda" else 1024, dtype=matmul_dtype, device=device)
    row = {
        "variant": args.variant, "device": info["device"], "batch": args.batch_size, "layout": args.layout,
        "text_rows": f"{shape.num_sequences}x{shape.sequence_length}", "attention": args.attn_implementation,
        "compile": args.compile, "grad_ckpt": args.grad_checkpointing,
        "step_s": step_s, "spread": spread(times), "images_per_s": args.batch_size / step_s,
        "tflop_per_step": flops["total"] / 1e12, "achieved_tflop_per_s": achieved / 1e12,
        "mfu_vs_datasheet": achieved / datasheet_peak if datasheet_peak else None,
        "mfu_vs_measured_matmul": achieved / measured_peak,
        "peak_memory_gib": peak_memory, "loss": loss,
    }
    print(format_flops(flops))
    print(f"\nbf16 peak: {datasheet_peak / 1e12 if datasheet_peak else float('nan'):.0f} TFLOP/s ({peak_source}); "
          f"measured {matmul_dtype} matmul peak: {measured_peak / 1e12:.2f} TFLOP/s\n")
    table = format_table([row], list(row))
    print(table)
    payload = {"benchmark": "gpu_step", "machine": info, "settings": vars(args), "flops": flops,
               "bf16_peak": {"flop_per_s": datasheet_peak, "source": peak_source},
               "measured_matmul_peak_flop_per_s": measured_peak, "step_times_s": times, "result": row, "table": table}
    name = f"gpu_step_{args.variant}_{device.type}.json"
    print(f"\nwrote {write_json(payload, Path(args.output) if args.output else RESULTS_DIR / name)}")


if __name__ == "__main__":
    main()
