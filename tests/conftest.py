"""Suite-wide setup: a guard against global torch state leaking between tests, and
a reproducible Hypothesis profile."""

from __future__ import annotations

import os

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_comparisons.py runs the guard below in a nested session

# ---------------------------------------------------------------------------
# Hypothesis: derandomized by default, so a run's examples are a function of the
# test's source (and the Hypothesis version) and CI failures reproduce locally.
# HYPOTHESIS_PROFILE=dev draws fresh random examples (and keeps a local
# database of failures) for exploratory runs.
# ---------------------------------------------------------------------------

try:
    from hypothesis import settings
except ImportError:  # the property tests importorskip hypothesis themselves
    settings = None
else:
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.register_profile("dev", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------------------
# Global torch state: every test starts and ends with the values the session
# started with. A test (or a module-level statement, or a fixture) that changes
# one and does not put it back is reported and the value restored, so results
# never depend on which tests ran before.
# ---------------------------------------------------------------------------


def _default_device():
    return torch.get_default_device() if hasattr(torch, "get_default_device") else None


def _set_default_device(device):
    if device is not None:
        torch.set_default_device(device)


_STATE = {
    "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
    "torch.are_deterministic_algorithms_enabled()": (
        torch.are_deterministic_algorithms_enabled,
        torch.use_deterministic_algorithms,
    ),
    "torch.get_default_device()": (_default_device, _set_default_device),
}

_BASELINE = {name: get() for name, (get, _) in _STATE.items()}


def _restore_changed():
    """Put every changed value back; return what had changed."""
    changed = []
    for name, (get, put) in _STATE.items():
        now = get()
        if now != _BASELINE[name]:
            put(_BASELINE[name])
            changed.append(f"{name}: {_BASELINE[name]} -> {now}")
    return changed


@pytest.fixture(autouse=True)
def _torch_global_state_guard(request):
    # Autouse fixtures are set up before, and torn down after, a test's other
    # function-scoped fixtures: a fixture that restores what it changed passes.
    changed = _restore_changed()
    if changed:
        pytest.fail(
            f"global torch state changed outside a test before {request.node.nodeid} "
            f"(a module import or a wider-scoped fixture); restored: {'; '.join(changed)}",
            pytrace=False,
        )
    yield
    changed = _restore_changed()
    if changed:
        pytest.fail(
            f"{request.node.nodeid} changed global torch state and did not restore it (restored now): "
            f"{'; '.join(changed)}. Use a fixture or try/finally to put it back.",
            pytrace=False,
        )
