"""Analytical FLOP count of one LCL training step (forward + backward), for MFU figures.

Only matrix products are counted (2·m·n·k FLOPs for an (m, k) @ (k, n) product), as in the usual MFU
convention (PaLM, nanoGPT): LayerNorm, GELU, softmax, the loss and the optimizer are left out, so the
MFU says how close the step gets to running nothing but matmuls at the measured matmul peak.

Backward costs twice the forward (gradient w.r.t. the input and w.r.t. the weight), except for the patch
embedding, whose input (the pixels) needs no gradient: 1x there. Attention products (`q @ k^T` and
`attn @ v`) are counted over the full `L x L` square that dense kernels compute, causal or not.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class StepShape:
    """What one training step computes on.

    num_images: images in the batch (each goes through the ViT and the pooler).
    num_sequences, sequence_length: the (padded) `input_ids` shape the causal transformer runs on.
    num_generation_targets: positions that go through `lm_head` (the model only projects those).
    num_contrastive_pairs: `<soi>` features in the contrastive loss.
    """

    num_images: int
    num_sequences: int
    sequence_length: int
    num_generation_targets: int
    num_contrastive_pairs: int


def _block_forward(tokens_per_seq: int, num_seqs: int, width: int, mlp: int) -> dict:
    """One pre-LN transformer block: q/k/v/out projections, attention products, MLP."""
    tokens = tokens_per_seq * num_seqs
    return {
        "qkv_proj": 2 * tokens * width * 3 * width,
        "attn_scores_and_values": 2 * 2 * num_seqs * tokens_per_seq**2 * width,
        "out_proj": 2 * tokens * width * width,
        "mlp": 2 * 2 * tokens * width * mlp,
    }


def training_step_flops(config, shape: StepShape) -> dict:
    """FLOPs of forward + backward, term by term, with the inputs of the formula.

    Returns a dict with `inputs` (every number the formula uses), `forward_terms` (per term, summed over
    layers), `forward`, `backward` and `total`.
    """
    vision, text = config.vision_config, config.text_config
    patch = vision.patch_size
    num_patches = config.num_image_tokens
    vision_tokens = num_patches + 1  # + class token
    width_v, mlp_v, layers_v = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    width_t, mlp_t, layers_t = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    dim, vocab = config.projection_dim, text.vocab_size
    images, seqs, seq_len = shape.num_images, shape.num_sequences, shape.sequence_length

    terms = {"vit_patch_embedding": 2 * images * num_patches * (vision.num_channels * patch * patch) * width_v}
    for name, value in _block_forward(vision_tokens, images, width_v, mlp_v).items():
        terms[f"vit_{name}"] = layers_v * value
    terms["pooler"] = (
        2 * width_v * dim  # probe query
        + 2 * 2 * images * num_patches * width_v * dim  # keys and values of every patch
        + 2 * 2 * images * num_patches * dim  # one query's scores and weighted sum
        + 2 * images * dim * dim  # out_proj of the pooled latent
        + 2 * images * num_patches * dim * dim  # out_proj of every patch: the image-token embeddings
    )
    for name, value in _block_forward(seq_len, seqs, width_t, mlp_t).items():
        terms[f"text_{name}"] = layers_t * value
    terms["text_projection_at_soi"] = 2 * shape.num_contrastive_pairs * width_t * dim
    terms["lm_head_on_targets"] = 2 * shape.num_generation_targets * width_t * vocab
    terms["contrastive_logits"] = 2 * 2 * shape.num_contrastive_pairs**2 * dim

    forward = sum(terms.values())
    backward = 2 * forward - terms["vit_patch_embedding"]
    return {
        "inputs": {
            "num_images": images,
            "num_sequences": seqs,
            "sequence_length": seq_len,
            "num_generation_targets": shape.num_generation_targets,
            "num_contrastive_pairs": shape.num_contrastive_pairs,
            "vision": {"patch": patch, "tokens": vision_tokens, "width": width_v, "mlp": mlp_v, "layers": layers_v},
            "text": {"width": width_t, "mlp": mlp_t, "layers": layers_t, "vocab": vocab},
            "projection_dim": dim,
        },
        "forward_terms": terms,
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
    }


def format_flops(result: dict) -> str:
    """Human-readable formula inputs and terms (GFLOP)."""
    inputs = result["inputs"]
    lines = [
        "FLOPs of one step (matmuls only; fwd + bwd = 3x fwd, patch embedding 2x):",
        f"  images={inputs['num_images']} sequences={inputs['num_sequences']}x{inputs['sequence_length']} "
        f"gen_targets={inputs['num_generation_targets']} pairs={inputs['num_contrastive_pairs']}",
        f"  vision {inputs['vision']}  text {inputs['text']}  projection_dim={inputs['projection_dim']}",
    ]
    lines += [f"  {name:28s} {value / 1e9:9.2f} GFLOP fwd" for name, value in result["forward_terms"].items()]
    lines.append(
        f"  forward {result['forward'] / 1e9:.1f} + backward {result['backward'] / 1e9:.1f} "
        f"= {result['total'] / 1e9:.1f} GFLOP"
    )
    return "\n".join(lines)
