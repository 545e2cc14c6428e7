"""Convert an OpenCLIP-format LCL checkpoint into a Transformers folder.

    python examples/convert_lcl_checkpoint.py --checkpoint LCL_ViT-B-16_laion.pt \
        --model-config lcl-vit-b-16-laion --output-dir lcl-vit-b-16-laion --verify

`--model-config` is a reference variant (lcl-vit-b-16-laion, lcl-vit-b-32-laion, lcl-vit-b-32-mmc4, or the
reference names LCL_ViT-B-16_laion, ...), an OpenCLIP model-config JSON, or an LCLConfig JSON/folder.
The output loads with `AutoModel.from_pretrained(output_dir)` after `import modeling_lcl`.

`--verify` compares the converted model with a reference-equivalent forward on the source tensors
(random inputs; text tokens avoid id 0, which the reference treats as padding) and fails above 1e-4;
nothing is written then. The tokenizer is the CLIP BPE of `processing.build_clip_tokenizer` (pass
`--clip-bpe bpe_simple_vocab_16e6.txt.gz` offline); `--no-processor` skips it.
"""

import argparse
import sys

from modeling_lcl.convert_lcl import VERIFY_TOLERANCE, convert_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="OpenCLIP state dict: .pt, .bin or .safetensors")
    parser.add_argument("--model-config", required=True, help="variant name, OpenCLIP JSON, or LCLConfig JSON/folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--verify", action="store_true", help="compare with the reference forward before writing")
    parser.add_argument("--tolerance", type=float, default=VERIFY_TOLERANCE, help="max abs diff allowed by --verify")
    parser.add_argument("--no-processor", action="store_true", help="do not write tokenizer/image-processor files")
    parser.add_argument("--clip-bpe", default=None,
                        help="CLIP merges file (bpe_simple_vocab_16e6.txt.gz) for the tokenizer, else found as "
                             "processing.build_clip_tokenizer describes")
    parser.add_argument("--no-model-card", action="store_true", help="do not write README.md")
    parser.add_argument("--no-remote-code", action="store_true",
                        help="do not copy the model's source files (needed for trust_remote_code=True loading)")
    parser.add_argument("--model-card-template", default=None, help="Jinja template (default: hub_configs/<variant>/)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = None
    if args.clip_bpe and not args.no_processor:
        from processing import build_clip_tokenizer

        tokenizer = build_clip_tokenizer(merges_path=args.clip_bpe)
    try:
        result = convert_checkpoint(
            args.checkpoint,
            args.model_config,
            args.output_dir,
            verify=args.verify,
            tolerance=args.tolerance,
            processor=not args.no_processor,
            tokenizer=tokenizer,
            model_card=not args.no_model_card,
            model_card_template=args.model_card_template,
            remote_code=not args.no_remote_code,
            overwrite=args.overwrite,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.verification is not None:
        print(f"{'output':<28} max abs diff")
        for name, diff in result.verification.items():
            print(f"{name:<28} {diff:.3e}")
    print(f"wrote {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
