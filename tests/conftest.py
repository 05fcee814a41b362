"""Shared fixtures: a small real corpus prepared once per session, and a helper that runs cloze's CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.test_data_helpers import web_and_code

ROOT = Path(__file__).resolve().parent.parent

# A slice of the interpreter's own stdlib: real text (code, docstrings, comments), present on every machine.
CORPUS_PACKAGES = ("json", "email", "logging", "urllib", "http")


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None, check: bool = False):
    """Run `python -m <args>` from the repository root; return CompletedProcess with text output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def corpus_files() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / pkg) for pkg in CORPUS_PACKAGES]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """~1.5 MB of stdlib source prepared into 4+ shards with a 1000-piece tokenizer."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    inputs = [arg for p in corpus_files() for arg in ("--input", f"{p}/**/*.py")]
    run_cli(["launch.prepare", *inputs, "--out", str(out),
             "--vocab-size", "1000", "--shard-bytes", "200000"], check=True)
    return out


@pytest.fixture(scope="module")
def web_and_code_sources(tmp_path_factory):
    """The two mixing sources of tests/test_data_helpers.web_and_code, written once per test module (module scope,
    so a module that damages its shards cannot reach another's)."""
    return web_and_code(tmp_path_factory.mktemp("web_and_code"))


@pytest.fixture(scope="module")
def web(web_and_code_sources):
    """'web': (root, docs, dataset_dir result)."""
    return web_and_code_sources[0]


@pytest.fixture(scope="module")
def code(web_and_code_sources):
    """'code': (root, docs, dataset_dir result)."""
    return web_and_code_sources[1]


def forward_on(enc, backend: str, ids, **kw):
    """The encoder's output under one attention backend, without gradients; the backend is set back to sdpa."""
    import torch

    enc.set_attention_backend(backend)
    try:
        with torch.no_grad():
            return enc(ids, **kw)
    finally:
        enc.set_attention_backend("sdpa")
