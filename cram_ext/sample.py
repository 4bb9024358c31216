"""Continue a prompt with the model of a `python -m cram_ext.train --task lm` run (a byte-level
language model: bytes in, bytes out), and print the attention utilization of each layer over
the generated tokens.

    python -m cram_ext.sample RUN_DIR --prompt "def " [--max-new-tokens 100] [--temperature 0.8 --top-k 20]
"""

from __future__ import annotations

import argparse

import torch

from .checkpoint import load_run
from .generation import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cram_ext.sample", description="Continue a prompt with the "
                                "model of a --task lm run (a byte-level language model).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a python -m cram_ext.train --task lm run folder")
    p.add_argument("--prompt", default="def ", help="the text to continue (UTF-8 bytes)")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="bytes to generate (prompt + these must fit the model's max_len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="of the sampling")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not a.prompt:
        p.error("--prompt: give at least one character to continue")
    model, config = load_run(a.run_dir, a.device)
    if config.get("task") != "lm":
        p.error(f"{a.run_dir} is a --task {config.get('task')} run: generation reads and writes bytes (--task lm)")
    prompt = torch.tensor([list(a.prompt.encode())], device=a.device)
    out = generate(model, prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                   generator=torch.Generator(a.device).manual_seed(a.seed))
    print(bytes(out.tokens[0].tolist()).decode(errors="replace"))
    print("attention utilization over the generated tokens, per layer: "
          + ", ".join(f"{100 * u:.1f}%" for u in out.utilization))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
