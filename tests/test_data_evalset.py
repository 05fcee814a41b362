"""The evaluation set on any number of shards and ranks (data/evalset.py), and every source and eval manifest checked
before the ranks start (launch/train/preflight.py): one error listing every problem, exit code 2."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import threading

import pytest
import torch

from data.evalset import eval_share, share_indices
from tests.conftest import run_cli
from tests.data_helpers import dataset_dir, random_docs

SEQ, BATCH = 32, 2


@pytest.mark.parametrize("batches", [1, 2, 5, 7])
def test_every_batch_is_counted_once_and_every_rank_runs_as_many(batches):
    for world in range(1, 6):
        shares = [share_indices(batches, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # the same number of forward passes on every rank
        counted = sorted(k for s in shares for k, c in s if c)
        assert counted == list(range(batches))
        assert all(0 <= k < batches for s in shares for k, _ in s)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "heldout"
    manifest = dataset_dir(root, random_docs(12, seed=5, max_len=90))
    assert len(manifest.shards) == 1
    return root


def test_the_set_is_the_same_for_any_world_size(one_shard):
    """One shard, 1 to 4 ranks: the counted batches, keyed by their index in the set, are the batches of one
    rank reading it all."""
    batches = 5
    whole = {b.index: b for b in eval_share(str(one_shard), SEQ, BATCH, batches, 0, 1, seed=3)}
    assert sorted(whole) == list(range(batches)) and all(b.counted for b in whole.values())
    for world in (2, 3, 4):
        seen = []
        for rank in range(world):
            for b in eval_share(str(one_shard), SEQ, BATCH, batches, rank, world, seed=3):
                assert torch.equal(b.input_ids, whole[b.index].input_ids)
                assert torch.equal(b.doc_ids, whole[b.index].doc_ids)
                if b.counted:
                    seen.append(b.index)
        assert sorted(seen) == list(range(batches))
    other = eval_share(str(one_shard), SEQ, BATCH, batches, 0, 1, seed=4)
    assert not all(torch.equal(a.input_ids, whole[a.index].input_ids) for a in other)  # the seed fixes the set


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_every_manifest_is_checked_before_the_ranks_start(tiny_data, tmp_path):
    """Sources and an eval set with five problems (two remote) and a cache folder that cannot be made: one error
    naming each, before any rank exists."""
    few = tmp_path / "few"
    dataset_dir(few, random_docs(5, seed=1, max_len=50))  # one shard for two ranks, and another tokenizer
    broken = tmp_path / "broken_eval"
    shutil.copytree(tiny_data, broken)
    (broken / "manifest.json").write_text("{not json")
    served = tmp_path / "www" / "web"
    shutil.copytree(tiny_data, served)
    manifest = json.loads((served / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (served / "manifest.json").write_text(json.dumps(manifest))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(served.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dead = f"http://127.0.0.1:{_closed_port()}/web"
    hashed = f"http://127.0.0.1:{server.server_address[1]}/web"
    not_a_folder = tmp_path / "cache_file"
    not_a_folder.write_text("")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "out_dir": str(tmp_path / "run"),
        "data": {"path": str(tiny_data), "seq_len": 64, "cache_dir": str(not_a_folder / "cache"),
                 "sources": {str(tiny_data): 1.0, str(few): 1.0, dead: 1.0, hashed: 1.0}},
        "eval": {"path": str(broken)},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 96,
                  "max_position_embeddings": 256},
        "train": {"micro_batch_size": 8, "max_steps": 4, "warmup_steps": 1},
    }))
    try:
        proc = run_cli(["launch.train", "--config", str(config), "--nproc", "2"], timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "world 2" not in proc.stdout + err  # no rank started
    block = err[err.index("error"):]
    assert f"data.sources.{few}: {few} was prepared with another tokenizer" in block
    assert f"data.sources.{dead}: cannot read the manifest" in block
    assert f"data.sources.{hashed}: tokenizer {hashed}/tokenizer/spm.model does not match" in block
    assert f"eval.path: {broken}/manifest.json: not valid JSON" in block
    assert f"data.cache_dir: cannot create {not_a_folder}/cache" in block
    assert "5 problems" in block


@pytest.mark.slow
@pytest.mark.distributed
def test_one_shard_eval_set_gives_the_same_result_on_one_and_two_ranks(tiny_data, tmp_path):
    """A one-shard eval set used to stop a two-rank run after its ranks started. Now it runs, and with the weights
    kept (a learning rate too small to move them) one rank and two ranks report the same evaluation."""
    heldout = tmp_path / "heldout"
    corpus = tmp_path / "text"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(f"held out line {i} of the evaluation text" for i in range(400)))
    run_cli(["launch.prepare", "--input", str(corpus / "a.txt"), "--tokenizer", str(tiny_data / "tokenizer" /
             "spm.model"), "--out", str(heldout)], check=True)
    assert len(json.loads((heldout / "manifest.json").read_text())["shards"]) == 1
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", str(nproc),
                        f"data.path={tiny_data}", f"out_dir={out}", f"eval.path={heldout}", "eval.batches=3",
                        "train.max_steps=1", "train.warmup_steps=0", "train.lr=1e-12", "train.weight_decay=0"],
                       timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads((out / "summary.json").read_text())["eval"]
    assert set(results[1]) == set(results[2]) and "eval/mlm_loss" in results[1]
    for key, value in results[1].items():
        assert results[2][key] == pytest.approx(value, rel=1e-5), key
