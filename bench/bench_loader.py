"""Data path throughput: cloze's loader against the usual WebDataset + transformers pipeline, in one run.

    .venv/bin/python -m bench.bench_loader [--corpus-mb 8] [--seconds 5] [--seq-len 512] [--batch-size 32]
                                           [--full-prepare]

What is measured, on the same documents (the interpreter's standard library, the embedded default corpus):
- prepare: `data.pipeline.prepare` (tokenizer training, then tokenization into shards): tokens/s and tokens/s
  per core of the tokenization phase, total time. --full-prepare runs it on the whole stdlib, as launch.demo does.
- cloze: pre-tokenized shards -> packing -> objectives' MLM (BERT 15%, 80/10/10), in one process (what one
  loader worker does, plus the masking the trainer does), and with one worker process feeding the main one.
- remote: the same shards served over http by a local server on 127.0.0.1 (a separate process), read through
  curl with and without the shard cache (data.cache_dir), against the local folder: tokens/s of the first epoch
  and of the two after it, so what the cache saves from the second epoch on is visible.
- peer: the same documents as WebDataset `.txt` samples, decoded by WebDataset, tokenized on the fly by the
  exported Hugging Face tokenizer, concatenated and cut into rows (run_mlm.py's group_texts, so no padding and
  no truncation waste: the peer's best case) and masked by transformers' DataCollatorForLanguageModeling.
Rates are tokens in finished rows per wall second, and per CPU second of this process (all its threads), which
stays meaningful when other jobs share the cores. One table, cloze's ratio to the peer in the last column.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from data.corpus import expand_inputs, iter_documents
from data.loader import Loader, LoaderConfig
from data.pipeline import PrepareConfig, prepare
from data.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDE = ["*/site-packages/*", "*/dist-packages/*"]


def corpus_subset(megabytes: float) -> list[Path]:
    """Stdlib .py files in sorted order until `megabytes` of text."""
    files, size = [], 0
    for path in expand_inputs([str(STDLIB / "**" / "*.py")], EXCLUDE):
        files.append(path)
        size += path.stat().st_size
        if size >= megabytes * 1e6:
            break
    return files


NOT_COUNTED: set[int] = set()
"""Child processes whose CPU time is not the loader's (the local http server of the remote rows)."""


def cpu_seconds() -> float:
    """CPU time of this process (all threads), of its live children (loader workers) and of the children it has
    waited for (curl, one per remote shard)."""
    import resource

    import psutil

    children = [c for c in psutil.Process().children(recursive=True) if c.pid not in NOT_COUNTED]
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.process_time() + done.ru_utime + done.ru_stime
            + sum(c.cpu_times().user + c.cpu_times().system for c in children))


def measure(step: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of calling step() (returns tokens) for `seconds`."""
    step()  # warm: first shard fetched, workers started, first tokenizer call
    tokens, wall0, cpu0 = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - wall0 < seconds:
        tokens += step()
    return tokens / (time.perf_counter() - wall0), tokens / max(cpu_seconds() - cpu0, 1e-9)


def write_txt_shards(files: list[Path], out: Path, per_shard: int = 200) -> list[str]:
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    urls, writer = [], None
    for i, (_, text) in enumerate(iter_documents(files, decode_errors="skip")):
        if not text:
            continue
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            urls.append(str(out / f"txt-{len(urls):06d}.tar"))
            writer = webdataset.TarWriter(urls[-1])
        writer.write({"__key__": f"{i:08d}", "txt": text})
    if writer is not None:
        writer.close()
    return urls


def peer_pipeline(urls: list[str], tokenizer_dir: Path, seq_len: int, batch_size: int) -> Callable[[], int]:
    """WebDataset .txt -> HF tokenizer on the fly -> group_texts -> DataCollatorForLanguageModeling."""
    import webdataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.model_max_length = 1 << 30  # whole documents are tokenized, then cut (group_texts): no length warning
    collator = DataCollatorForLanguageModeling(hf, mlm_probability=0.15, seed=0)

    def texts() -> Iterator[str]:
        while True:
            for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
                yield sample["txt"]

    source = texts()
    buffer: list[int] = []

    def step() -> int:
        need = seq_len * batch_size
        while len(buffer) < need:
            batch = [next(source) for _ in range(8)]
            for ids in hf(batch)["input_ids"]:
                buffer.extend(ids)
        rows = [buffer[i * seq_len : (i + 1) * seq_len] for i in range(batch_size)]
        del buffer[:need]
        out = collator([{"input_ids": r} for r in rows])
        return int(out["input_ids"].numel())

    return step


def cloze_pipeline(data: Path, seq_len: int, batch_size: int, workers: int, mask: bool) -> Callable[[], int]:
    from objectives import build_objective, step_generator
    from objectives.batch import TokenInfo

    tok = Tokenizer(data / "tokenizer" / "spm.model")
    info = TokenInfo(vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
                     mask_id=tok.mask_id, special_ids=tuple(tok.special_ids), first_ordinary_id=tok.first_ordinary_id)
    mlm = build_objective("mlm", {"rate": 0.15})
    loader = Loader(LoaderConfig([(str(data), 1.0)], seq_len=seq_len, batch_size=batch_size, num_workers=workers))
    counter = {"step": 0}

    def step() -> int:
        ids, doc_ids = next(loader)
        if mask:
            mlm(ids, doc_ids, step_generator(0, 0, counter["step"], 0), info)
        counter["step"] += 1
        return int(ids.numel())

    step.loader = loader  # type: ignore[attr-defined]  # closed by the caller
    return step


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """`python -m http.server` serving folder on 127.0.0.1 in a process of its own; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                             str(folder), "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    NOT_COUNTED.add(proc.pid)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
        match = re.search(r"port (\d+)", line)
        if match is None:
            raise RuntimeError(f"http.server did not start: {line!r}")
        yield f"http://127.0.0.1:{match[1]}"
    finally:
        proc.kill()
        proc.wait()
        NOT_COUNTED.discard(proc.pid)


def epoch_rates(spec: str, seq_len: int, batch_size: int, epochs: int, **kw) -> list[tuple[float, float]]:
    """(tokens per wall second, tokens per CPU second) of reading and packing each of the first `epochs` epochs
    of one source, one rank, in this process."""
    loader = Loader(LoaderConfig([(spec, 1.0)], seq_len=seq_len, batch_size=batch_size, **kw))
    rates = []
    try:
        for epoch in range(epochs):
            tokens, wall0, cpu0 = 0, time.perf_counter(), cpu_seconds()
            while loader.epoch == epoch:
                tokens += int(next(loader)[0].numel())
            rates.append((tokens / (time.perf_counter() - wall0), tokens / max(cpu_seconds() - cpu0, 1e-9)))
    finally:
        loader.close()
    return rates


def remote_rows(data: Path, seq_len: int, batch_size: int, cache: Path) -> list[tuple[str, str, str, str, str]]:
    """The local folder, http without cache and http with the shard cache: first epoch, then the mean of the next
    two."""
    setting = f"seq {seq_len} x batch {batch_size}"
    with http_server(data.parent) as base:
        url = f"{base}/{data.name}"
        runs = {"local folder": epoch_rates(str(data), seq_len, batch_size, 3),
                "http 127.0.0.1, no cache": epoch_rates(url, seq_len, batch_size, 3),
                "http 127.0.0.1, data.cache_dir": epoch_rates(url, seq_len, batch_size, 3, cache_dir=str(cache))}
    local_first, local_later = runs["local folder"][0][0], _later(runs["local folder"])[0]
    rows = []
    for name, rates in runs.items():
        for what, (wall, cpu), ref in (("epoch 1", rates[0], local_first),
                                       ("epochs 2-3", _later(rates), local_later)):
            rows.append((f"cloze read + pack, {name}: {what}", setting, fmt(wall), fmt(cpu),
                         f"{wall / ref:.2f}x the local folder's {what} (wall)"))
    return rows


def _later(rates: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean (wall, CPU) rate of the epochs after the first."""
    later = rates[1:]
    return sum(r[0] for r in later) / len(later), sum(r[1] for r in later) / len(later)


def fmt(rate: float) -> str:
    return f"{rate / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_loader", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-mb", type=float, default=8.0, help="stdlib text used for the loader comparison")
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per pipeline")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--full-prepare", action="store_true",
                    help="prepare the whole stdlib (launch.demo's corpus) and report that instead of the subset")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker's worth of CPU for the masking, as in a worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    cores = os.cpu_count() or 1
    rows: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="cloze-bench-") as tmp:
        work = Path(tmp)
        files = corpus_subset(args.corpus_mb)
        inputs = [str(STDLIB / "**" / "*.py")] if args.full_prepare else [str(f) for f in files]
        what = "whole stdlib" if args.full_prepare else f"{len(files)} stdlib files"
        print(f"[bench] preparing {what} ...", file=sys.stderr, flush=True)
        result = prepare(PrepareConfig(inputs=inputs, exclude=EXCLUDE, out_dir=work / "data",
                                       vocab_size=args.vocab_size, shard_bytes=4_000_000,
                                       max_tokenizer_sentences=8000, num_threads=cores))
        m, sec = result.manifest, result.seconds
        rows.append((f"prepare ({what}): train tokenizer, tokenize, write", f"{cores} threads", "", "",
                     f"total {sec['total']:.1f} s (tokenizer training {sec['tokenizer']:.1f} s)"))
        # again with the trained tokenizer: the tokenization phase alone, with its CPU time
        cpu0 = cpu_seconds()
        again = prepare(PrepareConfig(inputs=inputs, exclude=EXCLUDE, out_dir=work / "again",
                                      tokenizer=m.tokenizer_path, shard_bytes=4_000_000, num_threads=cores))
        cpu = cpu_seconds() - cpu0
        rate = m.tokens / again.seconds["shards"]
        rows.append(("prepare: tokenize + write shards (tokenizer given)", f"{cores} threads", fmt(rate),
                     fmt(m.tokens / cpu), f"{m.tokens / 1e6:.1f}M tokens in {again.seconds['total']:.1f} s; "
                     f"{fmt(rate / cores)} tokens/s per core"))
        data = work / "data"
        print("[bench] writing .txt shards for the peer ...", file=sys.stderr, flush=True)
        urls = write_txt_shards(files, work / "txt")
        s, b = args.seq_len, args.batch_size
        peer = measure(peer_pipeline(urls, data / "tokenizer", s, b), args.seconds)
        measured = {}
        for name, workers, mask in (("cloze read + pack", 0, False), ("cloze read + pack + MLM", 0, True),
                                    ("cloze 1 worker process, MLM in main", 1, True)):
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            step = cloze_pipeline(data, s, b, workers, mask)
            measured[name] = measure(step, args.seconds)
            step.loader.close()  # type: ignore[attr-defined]
        for name, (wall, cpu) in measured.items():
            rows.append((name, f"seq {s} x batch {b}", fmt(wall), fmt(cpu),
                         f"{wall / peer[0]:.1f}x / {cpu / peer[1]:.1f}x"))
        print("[bench] remote: local folder, http without and with the shard cache ...", file=sys.stderr, flush=True)
        rows += remote_rows(data, s, b, work / "cache")
        rows.append(("peer: wds .txt + HF tokenizer + DataCollatorForLanguageModeling", f"seq {s} x batch {b}",
                     fmt(peer[0]), fmt(peer[1]), "1.0x / 1.0x"))
    header = ("pipeline", "setting", "tokens/s (wall)", "tokens/CPU-s", "vs peer (wall / CPU); notes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = io.StringIO()
    for i, r in enumerate([header, *rows]):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |", file=out)
        if i == 0:
            print("|" + line + "|", file=out)
    print(out.getvalue(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
