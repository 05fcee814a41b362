"""What people watch: per-objective loss and accuracy, LR, grad norm, throughput, data wait.

Only rank 0 writes (TensorBoard, metrics.jsonl, the progress line); the values are reduced over ranks first, at log
steps only, so there is no collective inside ordinary steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def peak_flops_for(device: torch.device, peak_tflops: float) -> float:
    """FLOP/s of one accelerator for MFU: the configured value, else a guess by name; 0 (no MFU) on CPU."""
    if device.type != "cuda":
        return 0.0
    if peak_tflops > 0:
        return peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
    return next((v for k, v in table.items() if k in name), 0.0)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Metrics:
    def __init__(self, out_dir: Path, objective_names: list[str], rank: int, max_steps: int, device: torch.device,
                 hparams: dict, seq_len: int, peak_tflops: float):
        self.device = device
        self.seq_len = seq_len
        self.peak_flops = peak_flops_for(device, peak_tflops)
        self.names = list(objective_names)
        self.rank = rank
        self.max_steps = max_steps
        self.writer = None
        self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=1, default=str) + "\n```")
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
        self._reset()
        self.t_start = time.perf_counter()

    def _reset(self) -> None:
        # per objective: loss x labels, labels, correct, micro-batches
        self.acc = torch.zeros(len(self.names), 4, dtype=torch.float64)
        self.tokens = 0
        self.flops = 0.0
        self.data_wait = 0.0
        self.t_window = time.perf_counter()

    def micro(self, objective: str, loss: float, num_labels: int, num_correct: int, tokens: int, wait: float,
              flops: float):
        """One micro-batch's values; `flops` its useful training FLOPs (EncoderConfig.useful_flops), for MFU."""
        i = self.names.index(objective)
        self.acc[i] += torch.tensor([loss * num_labels, num_labels, num_correct, 1], dtype=torch.float64)
        self.tokens += tokens
        self.flops += flops
        self.data_wait += wait

    def step_record(self, step: int, record: dict) -> None:
        """Rank 0's own per-step values (no reduction): the exact curve used by resume tests."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()

    def log(self, step: int, lr: float, grad_norm: float | None, start_step: int,
            scheduled: dict[str, float] | None = None) -> dict:
        """Collective at log steps: reduce the window over ranks, then rank 0 writes. Returns the reduced values.
        scheduled: the values of the run's schedules at this step (launch/train/schedules.py), written as
        schedule/<key> beside share/<objective>, the realised share of the window's micro-batches."""
        # One reduction for everything, on the device (NCCL reduces GPU tensors only).
        extra = torch.tensor([self.tokens, self.data_wait, self.flops], dtype=torch.float64)
        flat = torch.cat([self.acc.flatten(), extra]).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(flat)
        flat = flat.cpu()
        acc, extra = flat[: -len(extra)].reshape(self.acc.shape), flat[-len(extra):]
        now = time.perf_counter()
        window = max(now - self.t_window, 1e-9)
        world = dist.get_world_size() if dist.is_initialized() else 1
        out: dict = {"lr": lr, "tokens_per_s": extra[0].item() / window,
                     "data_wait_share": extra[1].item() / (window * world)}
        out["samples_per_s"] = out["tokens_per_s"] / self.seq_len
        out["useful_tflops_per_device"] = extra[2].item() / window / world / 1e12
        if self.peak_flops:
            # Useful FLOPs only: the attention pairs the pattern lets meet and the head on labelled positions, as
            # counted per micro-batch; what a kernel computes beyond that (masked pairs) does not count.
            out["mfu"] = extra[2].item() / window / (self.peak_flops * world)
        out["memory_gib"] = peak_memory_gib(self.device)
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        batches = acc[:, 3].sum().item()
        for key, value in (scheduled or {}).items():
            out[f"schedule/{key}"] = value
        for i, name in enumerate(self.names):
            loss_sum, labels, correct, count = acc[i].tolist()
            if batches > 0 and len(self.names) > 1:
                out[f"share/{name}"] = count / batches
            if labels > 0:
                out[f"loss/{name}"] = loss_sum / labels
                out[f"accuracy/{name}"] = correct / labels
        if self.rank == 0:
            for k, v in out.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
            done = step - start_step
            eta = (now - self.t_start) / max(done, 1) * (self.max_steps - step)
            losses = " ".join(f"{n} {out[f'loss/{n}']:.3f}" for n in self.names if f"loss/{n}" in out)
            print(f"step {step:>6}/{self.max_steps} | loss {losses} | lr {lr:.2e} | "
                  f"{out['tokens_per_s'] / 1e3:.1f}k tok/s | data wait {100 * out['data_wait_share']:.0f}% | "
                  f"eta {fmt_duration(eta)}", file=sys.stderr, flush=True)
        self._reset()
        return out

    def write(self, step: int, values: dict[str, float]) -> None:
        """Already-reduced values (evaluation): TensorBoard, metrics.jsonl and one line, rank 0 only."""
        if self.rank != 0 or not values:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        print(f"eval @ step {step}: " + " | ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in values.items()),
              file=sys.stderr, flush=True)

    def data(self, step: int, stats: dict[str, int]) -> None:
        """Loader counters (already summed over ranks): TensorBoard always, a warning line when data was skipped."""
        if self.rank != 0:
            return
        for k, v in stats.items():
            self.writer.add_scalar(f"data/{k}", v, step)
        skipped = {k: v for k, v in stats.items() if k.startswith("skipped_") and v}
        if skipped:
            print(f"warning: data skipped so far (on_bad_data=skip): {skipped}", file=sys.stderr, flush=True)

    def hparams(self, cfg, final: dict[str, float]) -> None:
        """TensorBoard's HPARAMS tab: the knobs people compare runs by, against the final metrics."""
        if self.rank != 0:
            return
        t = cfg.train
        hp = {"lr": t.lr, "schedule": t.schedule, "warmup_steps": t.warmup_steps, "max_steps": t.max_steps,
              "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum, "seq_len": cfg.data.seq_len,
              "weight_decay": t.weight_decay, "precision": t.precision, "seed": t.seed,
              "mix": ",".join(f"{k}={v}" for k, v in cfg.objectives.mix.items()),
              **{f"model.{k}": v for k, v in cfg.model.encoder_kwargs().items()}}
        metrics = {f"hparam/{k}": v for k, v in final.items() if isinstance(v, float) and v == v}
        self.writer.add_hparams(hp, metrics, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


