"""`ps-sample`: generate text from a model that `ps-cluster` trained.

ps-sample --model runs/first/model.safetensors --prompt "def main(" --bytes 300
"""

from __future__ import annotations

import sys

from asyncps_common.flags import FlagParser, non_negative, positive
from worker.task import generate, load_model


def build_parser() -> FlagParser:
    p = FlagParser(prog="ps-sample", description="Generate text with a trained asyncps byte-level model.")
    p.env_flag("model", required=False, help="the model.safetensors file ps-cluster wrote")
    p.env_flag("prompt", default="import ", help="text to continue")
    p.env_flag("bytes", type=positive(int), default=300, help="how many bytes to generate")
    p.env_flag("temperature", type=non_negative(float), default=0.8, help="sampling temperature (0: greedy)")
    p.env_flag("top-k", type=non_negative(int), default=40, help="sample among the k likeliest bytes (0: all)")
    p.env_flag("seed", type=non_negative(int), default=0, help="sampling seed")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model is required: the model.safetensors file of a run")
    try:
        model, _cfg = load_model(args.model)
    except (FileNotFoundError, ValueError, OSError) as exc:
        p.error(f"--model {args.model}: {exc}")
    prompt = args.prompt.encode()
    out = generate(model, prompt, args.bytes, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
    sys.stdout.write((prompt + out).decode("utf-8", errors="replace") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
