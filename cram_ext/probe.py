"""The redundancy probe: how much of a trained model's attention output can a small network
predict from the hidden state alone?

    python -m cram_ext.probe RUN_DIR [--tol 0.1 0.3 0.5] [--examples 256]

For each checkpoint of RUN_DIR (checkpoint-<step>.pt, written with --keep-checkpoints, and
the final checkpoint.pt) of a run with --model transformer --attention sdpa, and for each
layer: collect, on held-out examples, the attention layer's input (its normalised hidden
state) and its output before the output projection; fit a predictor of the output from the
input (an MLP of the semantic memory's shape, on the first half of the tokens); report on
the other half the fraction of attention operations (token x head) whose relative error
||pred - attn||^2 / ||attn||^2 is at most each tol. The CRAM paper reports 88% of GPT-2's
attention operations as predictable from the hidden state, a share that does not fall
during training; its tolerance is not public, hence several.

Writes RUN_DIR/probe.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .models import TransformerLM
from .tasks import make_task


def collect(model: TransformerLM, tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer: (attention input, attention output before out_proj), (N*T, E) and (N*T, H*D)."""
    pairs: list[tuple[Tensor, Tensor]] = []
    hooks = []
    for block in model.blocks:
        # The layer's input first (pre-hook), then its output projection's input.
        hooks.append(block.attn.register_forward_pre_hook(
            lambda mod, inputs: pairs.append((inputs[0].detach().flatten(0, 1), None))))
        hooks.append(block.attn.out_proj.register_forward_hook(
            lambda mod, inputs, output: pairs.__setitem__(-1, (pairs[-1][0], inputs[0].detach().flatten(0, 1)))))
    model.eval()
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return pairs


def fit_predictor(x: Tensor, y: Tensor, steps: int = 400, seed: int = 0) -> nn.Module:
    """An MLP E -> 2E -> H*D (the semantic memory's shape) fitted by Adam on (x, y), on x's device."""
    torch.manual_seed(seed)
    z = F.layer_norm(x, (x.shape[-1],))
    net = nn.Sequential(nn.Linear(x.shape[-1], 2 * x.shape[-1]), nn.GELU(),
                        nn.Linear(2 * x.shape[-1], y.shape[-1])).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)  # the same minibatches on every device
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(4096, x.shape[0]),), generator=gen).to(x.device)
        loss = (net(z[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def predictable_fraction(net: nn.Module, x: Tensor, y: Tensor, heads: int, tols: list[float]) -> dict[str, float]:
    with torch.no_grad():
        pred = net(F.layer_norm(x, (x.shape[-1],)))
    err = (pred - y).view(y.shape[0], heads, -1).pow(2).sum(-1)
    norm = y.view(y.shape[0], heads, -1).pow(2).sum(-1).clamp_min(1e-12)
    rel = err / norm
    return {str(t): float((rel <= t).float().mean()) for t in tols}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's kept checkpoints and its final one, one per step, in order."""
    found: dict[int, Path] = {}
    final = run_dir / "checkpoint.pt"
    if final.exists():
        found[checkpoint.load(final, "cpu")["step"] + 1] = final
    for p in run_dir.glob("checkpoint-*.pt"):
        m = re.fullmatch(r"checkpoint-(\d+)\.pt", p.name)
        if m:
            found[int(m.group(1))] = p
    return sorted(found.items())


def probe_run(run_dir: Path, tols: list[float], examples: int = 256, device: str = "cpu") -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())
    if cfg.get("model") != "transformer" or cfg["model_config"].get("attention") != "sdpa":
        # A routed layer's pre-projection output is the semantic memory's own at the tokens it
        # did not route: predictable from the hidden state by construction.
        raise checkpoint.RunError(f"{run_dir}: the probe reads dense transformer runs (--model transformer "
                                  "--attention sdpa)")
    args = argparse.Namespace(**{k: v for k, v in cfg.items() if k not in ("model_config", "data")})
    task = make_task(args)
    batch = task.eval_batch(examples, args.seed + 1, torch.device(device))
    model, _ = checkpoint.load_run(run_dir)
    model.to(device)
    heads = model.cfg.num_heads
    out = {"run": str(run_dir), "tolerances": tols, "examples": examples, "steps": []}
    for step, path in checkpoints(run_dir):
        model.load_state_dict(checkpoint.load(path, device)["model"])
        layers = []
        for x, y in collect(model, batch["inputs"]):
            half = x.shape[0] // 2
            net = fit_predictor(x[:half], y[:half])
            layers.append(predictable_fraction(net, x[half:], y[half:], heads, tols))
        out["steps"].append({"step": step, "layers": layers})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--tol", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--examples", type=int, default=256, help="held-out examples (half fit, half measure)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the model runs and the predictors are fitted")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = probe_run(args.run_dir, args.tol, args.examples, args.device)
    (args.run_dir / "probe.json").write_text(json.dumps(result, indent=2))
    print("step   layer  " + "  ".join(f"tol {t}" for t in args.tol))
    for s in result["steps"]:
        for i, layer in enumerate(s["layers"]):
            print(f"{s['step']:6d} {i:5d}  " + "  ".join(f"{100 * layer[str(t)]:6.1f}%" for t in args.tol))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
