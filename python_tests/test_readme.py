"""The README's usage example must run as written."""

import importlib.util
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    examples = [b for b in blocks if "import cram_ext" in b and not b.lstrip().startswith(">>>")]
    assert examples, "README has no runnable python example"
    if importlib.util.find_spec("transformers") is None:  # an optional dependency (cram_ext.hf)
        examples = [b for b in examples if "import transformers" not in b]
    for code in examples:
        exec(compile(code, str(README), "exec"), {})


def test_benchmark_tables_match_results():
    """docs/benchmarks.md is generated from bench/results/: regenerate it when results change."""
    import sys

    sys.path.insert(0, str(README.parent))
    from bench.report import render

    assert (README.parent / "docs" / "benchmarks.md").read_text() == render()
