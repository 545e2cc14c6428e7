"""Image-feature throughput: `LCLModel.get_image_features` vs OpenCLIP's `encode_image`, same-size ViT.

    python benchmarks/image_features.py                      # ViT-B/32, batch 16, fp32 on CPU
    python benchmarks/image_features.py --variant b16-laion

OpenCLIP (`pip install open_clip_torch`) is optional: without it only our figures are printed. Both
models are built with random weights (no download), put in eval mode and run under
`torch.inference_mode()`; their calls are interleaved so that both see the same machine load. OpenCLIP's
model is the plain CLIP ViT of the same size (`ViT-B-32` / `ViT-B-16`: 768 wide, 12 layers, exact GELU),
whose head is a linear projection where ours has the attentive pooler.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import RESULTS_DIR, format_table, lcl_config, machine_info, median, spread, write_json  # noqa: E402

OPEN_CLIP_MODELS = {"b32-laion": "ViT-B-32", "b32-mmc4": "ViT-B-32", "b16-laion": "ViT-B-16"}


def build_contenders(variant: str) -> dict:
    """name -> callable(pixel_values) returning features."""
    from modeling_lcl import LCLModel

    torch.manual_seed(0)
    ours = LCLModel(lcl_config(variant)).eval()
    contenders = {"ours: LCLModel.get_image_features": ours.get_image_features}
    try:
        import open_clip
    except ImportError:
        print("open_clip_torch is not installed: measuring ours only")
        return contenders
    reference = open_clip.create_model(OPEN_CLIP_MODELS[variant]).eval()
    contenders[f"OpenCLIP {open_clip.__version__}: {OPEN_CLIP_MODELS[variant]}.encode_image"] = reference.encode_image
    return contenders


@torch.inference_mode()
def time_interleaved(contenders: dict, pixel_values: torch.Tensor, warmup: int, steps: int) -> dict:
    times = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(warmup + steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            contenders[name](pixel_values)
            seconds = time.perf_counter() - start
            if i >= warmup:
                times[name].append(seconds)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="b32-laion", choices=sorted(OPEN_CLIP_MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info()
    config = lcl_config(args.variant)
    size = config.vision_config.image_size
    pixel_values = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    contenders = build_contenders(args.variant)
    times = time_interleaved(contenders, pixel_values, args.warmup, args.steps)

    rows = [{"model": name, "batch_s": median(t), "spread": spread(t), "images_per_s": args.batch_size / median(t),
             "batch_times_s": t} for name, t in times.items()]
    ours_rate = rows[0]["images_per_s"]
    for row in rows:
        row["ours_vs_this"] = ours_rate / row["images_per_s"]
    table = format_table(rows, ["model", "batch_s", "spread", "images_per_s", "ours_vs_this"])
    print(f"{args.variant}, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.steps} timed batches each (medians)\n")
    print(table)
    payload = {"benchmark": "image_features", "machine": info, "settings": vars(args), "rows": rows, "table": table}
    output = Path(args.output) if args.output else RESULTS_DIR / f"image_features_{args.variant}.json"
    print(f"\nwrote {write_json(payload, output)}")


if __name__ == "__main__":
    main()
