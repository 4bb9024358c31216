"""Property tests of gated_scan, route, routed_attention, metaplastic_scan (forward and backward) and
routed_decode against the reference over the input space of fuzz_space.py (sizes, dtypes, routings,
memory layouts of every argument and incoming gradient), drawn by hypothesis.

The default profile ("ci") draws a fixed, bounded set of examples per op and device
(derandomized, so CI is reproducible); CRAM_HYPOTHESIS_PROFILE=long draws many more, fresh
each run, to hunt for bugs. On a GPU, python_tests/cuda_fuzz.py runs the same space at
scale under compute-sanitizer.
"""

from __future__ import annotations

import os

import pytest
from conftest import DEVICES
from fuzz_space import OPS, HypothesisDraw, check_attention, draw_attention_case
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=250, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("CRAM_HYPOTHESIS_PROFILE", "ci"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
@given(data=st.data())
def test_matches_reference(op, device, data):
    draw_case, check = OPS[op]
    case = draw_case(HypothesisDraw(data), device)
    note(str(case))
    check(case, device)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
@settings(max_examples=60)
def test_malformed_routing_is_safe(device, data):
    """Unsorted, out-of-range, duplicated positions, counts outside [0, T]: a wrong answer
    is allowed (docs/design.md §2), an exception or a crash is not (memory safety itself is checked
    on the GPU under compute-sanitizer by cuda_fuzz.py)."""
    case = draw_attention_case(HypothesisDraw(data), device, malformed_rate=1)
    note(str(case))
    check_attention(case, device)
