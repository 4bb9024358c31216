"""Microbenchmarks of the cram ops beside their baselines.

Run as modules from the repository root:

    python -m bench.attention   # routed_attention vs dense SDPA / FlexAttention
    python -m bench.scan        # gated_scan vs fla chunk_hgrn / associative_scan / eager
    python -m bench.router      # route vs eager and torch.compile PyTorch

Each module declares one Bench (bench/registry.py) that bench/runner.py runs. See
bench/README.md for the flags, where records go and the JSON record schema.
"""
