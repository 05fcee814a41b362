"""Shared fixtures: a small real corpus prepared once per session, and a helper that runs cloze's CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.data_helpers import web_and_code

ROOT = Path(__file__).resolve().parent.parent


SLURM_MODULES = ("tests/test_slurm_client.py", "tests/test_slurm_cluster.py")
"""The modules whose tests use the one local Slurm cluster: under `-n` they run in one worker, one after another
(there is one job queue, and a test that waits for its job's requeue must not find another test's job on its
nodes)."""


def module_of(nodeid: str) -> str:
    """The test module a test id belongs to, e.g. 'tests/test_train.py'."""
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """Order the tests so the longest work goes first (xdist hands modules out in this order): the Slurm modules,
    then modules with slow tests, then multi-process ones, then the rest; no worker is left alone with a long tail.
    A test that uses the cluster outside SLURM_MODULES is refused, as it would run beside the Slurm modules."""
    def rank(item) -> int:
        if module_of(item.nodeid) in SLURM_MODULES:
            return 0
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} uses the Slurm cluster: add its module to SLURM_MODULES "
                                    "in tests/conftest.py")
        return 1 if item.get_closest_marker("slow") else 2 if item.get_closest_marker("distributed") else 3

    ranks: dict[str, int] = {}
    for item in items:
        ranks[module_of(item.nodeid)] = min(ranks.get(module_of(item.nodeid), 3), rank(item))
    items.sort(key=lambda item: ranks[module_of(item.nodeid)])  # stable: a module stays together, at its slowest


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the Slurm modules as one unit: each module runs whole in one worker, so a module's
    expensive fixtures (trained runs, exports) are built once, and the cluster serves one test at a time."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModulesAndSlurm(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if module_of(nodeid) in SLURM_MODULES else module_of(nodeid)

    return ModulesAndSlurm(config, log)


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



def run_whole_and_cut(common: list[str], tmp_path: Path, stop_at: int, max_steps: int) -> tuple[list[dict], list[dict]]:
    """Train `common` uninterrupted (out_dir whole/) and stopped at `stop_at` then resumed (out_dir cut/); returns
    both runs' per-step records of metrics.jsonl, after checking the resumed curve has no gap and no repeat."""
    import json

    run_cli([*common, f"out_dir={tmp_path / 'whole'}"], check=True)
    first = run_cli([*common, f"out_dir={tmp_path / 'cut'}", f"train.stop_at={stop_at}"], check=True)
    assert f"stopped at step {stop_at}" in first.stderr
    second = run_cli([*common, f"out_dir={tmp_path / 'cut'}"], check=True)
    assert "resumed from" in second.stderr
    runs = []
    for name in ("whole", "cut"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs.append([r for r in rows if "loss" in r])
    assert [r["step"] for r in runs[1]] == list(range(1, max_steps + 1)), "a gap or a repeated step after resuming"
    return runs[0], runs[1]

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
    """The two mixing sources of tests/data_helpers.web_and_code, written once per test module (module scope,
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


def assert_compiled_flex_matches_eager_sdpa(cfg, batches):
    """The trainer's GPU path: compiled blocks with "auto" attention (flex wherever a mask is needed) give the loss
    and gradients of eager dense-mask SDPA on each (kind, args) of `batches` (fp32 both sides, plus inductor's
    reassociation, ~1e-7). CUDA only: torch has no CPU backward for flex."""
    import torch

    from model import EncoderForPretraining
    from model.encoder import compile_layers

    torch._dynamo.reset()
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    eager = EncoderForPretraining(cfg).to(cuda)
    fast = EncoderForPretraining(cfg, attn_backend="auto").to(cuda)
    fast.load_state_dict(eager.state_dict())
    compile_layers(fast)
    ids = torch.randint(5, 100, (3, 40), generator=torch.Generator().manual_seed(3)).to(cuda)
    labels = torch.where(torch.arange(40, device=cuda) % 3 == 0, ids, torch.full_like(ids, -100))
    for kind, args in batches:
        args = {k: v.to(cuda) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        eager.zero_grad()
        fast.zero_grad()
        want, got = eager(ids, labels, **args).loss, fast(ids, labels, **args).loss
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=kind)
        for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=f"{kind} {name}")


def block_mask_tiles(block_mask, batch: int, tiles: int):
    """[B, tiles, tiles] int: 0 skipped, 1 partial (mask_mod applied), 2 full, read from the BlockMask indices."""
    import torch

    out = torch.zeros(batch, tiles, tiles, dtype=torch.long)
    for value, counts, indices in ((1, block_mask.kv_num_blocks, block_mask.kv_indices),
                                   (2, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        for b in range(batch):
            for row in range(tiles):
                for col in indices[b, 0, row, : counts[b, 0, row]].tolist():
                    assert out[b, row, col] == 0, "a tile listed twice"
                    out[b, row, col] = value
    return out
