"""Shared fixtures: the tiny Llama factory (fast), the real SmolLM2-135M (slow, loaded once per session), one BLAS
thread (or ``SVDADAPT_TEST_THREADS``). Plain helper functions live in helpers.py."""

from __future__ import annotations

import copy

import pytest
import torch

# re-exported: test files import them from helpers; older ones (and ones being written) from conftest
from helpers import TEST_THREADS, make_tiny_llama, tiny_llama_config  # noqa: F401

REAL_MODEL_FIXTURE = "_smollm2_session"


@pytest.hookimpl(tryfirst=True)  # before the -m selection
def pytest_collection_modifyitems(config, items):
    """Every test that loads the real SmolLM2 (through smollm2, smollm2_dir or the session fixture) is slow, marked
    or not: ``-m "not slow"`` never loads it."""
    for item in items:
        if REAL_MODEL_FIXTURE in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture(scope="session")
def _smollm2_session():
    from svdadapt.loading import load_smollm2

    return load_smollm2()


@pytest.fixture
def smollm2(_smollm2_session):
    """``(model, tokenizer)``: a private deep copy of the real SmolLM2-135M-Instruct (fp32, eval), so tests
    may wrap or train it freely. Tests that use it are slow (marked so at collection, if not already)."""
    model, tok = _smollm2_session
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def smollm2_dir(_smollm2_session, tmp_path_factory):
    """The real model saved once as an ordinary Hugging Face directory (reloads in ~1 s)."""
    model, tok = _smollm2_session
    d = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d




@pytest.fixture
def one_thread():
    """Many small BLAS/LAPACK calls: with other processes on the CPU, a second OpenMP thread makes them
    up to 100x slower (spin-waiting), and one thread is as fast when the machine is quiet. The environment
    variable ``SVDADAPT_TEST_THREADS`` (default 1) sets another count, to run the numeric tests at another
    summation order (.ci/run does)."""
    n = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tmp():
    """A scratch directory under the system's temporary directory (short paths), deleted afterwards."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="svdadapt-test-") as d:
        yield Path(d)
