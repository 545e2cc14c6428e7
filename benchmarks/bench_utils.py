"""Helpers shared by the benchmark scripts: model configs, timing, memory, matmul peak, JSON + table.

Every benchmark in this folder prints a table and writes the same figures, plus the machine they were
measured on, to a JSON file (by default under `benchmarks/results/`).
"""

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Reference LCL variants, as `LCLConfig` keyword arguments (widths and depths of the reference OpenCLIP
# configs `LCL_ViT-B-32_laion`, `LCL_ViT-B-16_laion`, `LCL_ViT-B-32_mmc4`).
_VIT_B = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
MODEL_VARIANTS = {
    "b32-laion": {
        "vision_config": {**_VIT_B, "patch_size": 32, "image_size": 224},
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                        "num_attention_heads": 8, "max_position_embeddings": 128},
        "projection_dim": 512,
        "pooler_num_attention_heads": 8,
    },
    "b16-laion": {
        "vision_config": {**_VIT_B, "patch_size": 16, "image_size": 224},
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "max_position_embeddings": 280},
        "projection_dim": 768,
        "pooler_num_attention_heads": 12,
    },
    "b32-mmc4": {
        "vision_config": {**_VIT_B, "patch_size": 32, "image_size": 224},
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                        "num_attention_heads": 8, "max_position_embeddings": 2048},
        "projection_dim": 512,
        "pooler_num_attention_heads": 8,
    },
    # A few-MB model with the same structure, for smoke runs of the scripts (`--variant tiny`).
    "tiny": {
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "patch_size": 8, "image_size": 32},
        "text_config": {"vocab_size": 49411, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 64},
        "projection_dim": 32,
        "pooler_num_attention_heads": 2,
    },
}


def lcl_config(variant: str, **overrides):
    """`LCLConfig` of a named variant (see `MODEL_VARIANTS`)."""
    from modeling_lcl import LCLConfig

    if variant not in MODEL_VARIANTS:
        raise ValueError(f"Unknown model variant {variant!r}; choose one of {sorted(MODEL_VARIANTS)}.")
    return LCLConfig(**MODEL_VARIANTS[variant], **overrides)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Run `fn` once; return (seconds, result)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def median(values) -> float:
    return float(statistics.median(values))


def spread(values) -> float:
    """(max - min) / median: how steady the timed repeats were."""
    values = list(values)
    return (max(values) - min(values)) / median(values) if values else float("nan")


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (`VmHWM`).

    Not `ru_maxrss`: Linux carries that over from the parent through fork + exec, so a child process
    would report its parent's peak.
    """
    return _proc_status_mib("VmHWM")


def current_rss_mib() -> float:
    """Resident set size now (`VmRSS`)."""
    return _proc_status_mib("VmRSS")


def matmul_peak_flops(size: int = 4096, repeats: int = 5, dtype=torch.float32, device="cpu") -> float:
    """Measured matmul throughput (FLOP/s): median over `repeats` of one `size`² x `size`² `torch.mm`.

    This is the ceiling an MFU is quoted against: what this machine's BLAS reaches on a large, square,
    well-shaped product with the current thread count, not a datasheet figure.
    """
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / median(seconds)


def machine_info() -> dict:
    """Where and when the figures were taken."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def write_json(payload: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table of `rows` (dicts) restricted to `columns`; floats get 3 significant digits."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
