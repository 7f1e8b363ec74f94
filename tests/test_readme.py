"""The README's usage snippet runs as written (at a shorter sequence length)."""

import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_usage_snippet_runs():
    code = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)[0]
    assert "T, d = 2, 8, 2, 1024, 64" in code
    namespace = {}
    exec(code.replace("T, d = 2, 8, 2, 1024, 64", "T, d = 2, 8, 2, 96, 16"), namespace)
    assert namespace["q"].grad is not None and torch.isfinite(namespace["q"].grad).all()
    assert torch.isfinite(namespace["hinge"])
