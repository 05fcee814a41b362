"""The pretraining loop: build every part from the validated config, train, checkpoint, close.

Randomness is a pure function of (seed, step, rank): the mixer picks the objective from (seed, micro-step), each
rank's masks come from a generator seeded by (seed, rank, micro-step), the shard order from (seed, epoch). A
resumed run therefore needs only the step and the loader position to continue exactly where it stopped.

One step, in the order `Trainer.train` runs it (each a method below):
    _fetch             the micro-batch: rows from the stream, masked by the objective the mixer picks, on the device
    _forward_backward  forward, the loss guard (a non-finite loss on any rank: every rank backwards a null batch)
                       and the backward
    _prefetch          the next micro-batch, read and masked while the device runs this backward
    _apply_update      engine.step(): DeepSpeed updates the weights at the accumulation boundary
    _after_step        metrics, evaluation, then stop (train.stop_at), preemption or a periodic checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from launch.config import ConfigError, RunConfig, config_hash, warn
from launch.train import checkpoint
from launch.train.checkpoint import load_engine
from launch.train.dist import DistEnv, env_var
from launch.train.faults import NO_FAULTS, Faults
from launch.train.metrics import Metrics, fmt_duration
from launch.train.optim import build_optimizer, build_scheduler
from launch.train.preempt import Preemption
from launch.train.preflight import Preflight, preflight
from launch.train.resume import ResumePlan, data_identity, plan_resume
from launch.train.runlock import RunDirLocked, RunLock, acquire
from launch.train.schedules import build as build_schedules

if TYPE_CHECKING:
    from model.config import EncoderConfig
    from model.heads import EncoderForPretraining, PretrainOutput
    from objectives.batch import Batch, TokenInfo


class TrainingHalted(RuntimeError):
    """The run cannot usefully continue (e.g. repeated non-finite losses); the CLI exits 3 with this message."""


def log0(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[cloze] {msg}", file=sys.stderr, flush=True)


@dataclass
class MicroBatch:
    """One micro-batch on its way to the forward: masked by its objective, its tensors already on the device."""

    objective: str
    """The objective the mixer picked for it."""
    host: Batch
    """The batch on the host: the mixer counts its labels there without waiting for the device."""
    device: Batch
    """The same batch on the training device."""
    label_positions: torch.Tensor
    """Flat indices of the labelled positions, on the device: the forward then never asks the device how many."""
    tokens: int
    """Tokens in the micro-batch (rows x seq_len)."""
    wait_s: float
    """Seconds spent waiting for the loader."""
    pairs: int
    """(query, key) pairs a global layer lets meet, for the useful FLOPs."""
    local_pairs: int | None
    """The same for a local layer; None when the model has no local layers."""


@dataclass(frozen=True)
class StreamBoundary:
    """The stream's position and counters between two steps, taken before the next step's first micro-batch is
    prefetched, so a checkpoint after this step records exactly the batches it trained on."""

    state: dict
    consumed: int
    """How many of the stream's consumed shards were consumed by then."""
    stats: dict[str, int]


def token_info(tok: Any) -> TokenInfo:
    """What the objectives need to know of the run's tokenizer (data.tokenizer.Tokenizer)."""
    from objectives.batch import TokenInfo

    return TokenInfo(
        vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id,
        special_ids=tuple(tok.special_ids), first_ordinary_id=tok.first_ordinary_id,
        mode_ids=tuple(sorted(tok.mode_ids.items())), word_start=torch.as_tensor(tok.word_start),
    )


def encoder_config(cfg: RunConfig, pre: Preflight) -> EncoderConfig:
    """The model's shape: model.init_from's folder's, else the config's model section with the tokenizer's ids."""
    from model.config import EncoderConfig

    if pre.init_from:
        return pre.init_from.encoder
    tok = pre.tokenizer
    return EncoderConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, cls_token_id=tok.cls_id,
                         sep_token_id=tok.sep_id, mask_token_id=tok.mask_id, **cfg.model.encoder_kwargs())


def _import_deepspeed_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with torch.compile switched off while it loads.

    deepspeed.initialize imports that module to check whether the optimizer is one ZeRO supports, and its
    @torch.compile decorators import all of inductor on the way: 1.5-3 s of every rank's start (measured on the CI
    CPUs), paid by every run and every test that launches one. cloze never uses Muon, so its functions may stay
    uncompiled. The switch is the TORCHDYNAMO_DISABLE variable, which dynamo reads only when a function is
    decorated; it is restored at once, so cloze's own torch.compile (train.compile) is untouched."""
    with env_var("TORCHDYNAMO_DISABLE", "1"), contextlib.suppress(ImportError):  # no Muon: nothing to skip
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, faults: Faults = NO_FAULTS):
        import deepspeed

        self.cfg, self.env, self.faults = cfg, env, faults
        self.rank, self.world = env.rank, env.world_size
        has_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", env.local_rank) if has_gpu else torch.device("cpu")
        # Validate everything that needs the world size or the data before the engine exists.
        pre = preflight(cfg, self.world)
        self.zero_stage = int(pre.ds_config["zero_optimization"].get("stage", 0))
        device_name = torch.cuda.get_device_name(self.device) if has_gpu else "CPU"
        self.hardware = f"{self.world} x {device_name} ({pre.precision}, ZeRO-{self.zero_stage})"
        self.manifest, self.tokenizer_model = pre.manifest, pre.tokenizer.model_bytes
        self.tok_info = token_info(pre.tokenizer)
        self.enc_cfg = encoder_config(cfg, pre)
        # Everything above is validation a user can fix; only now start the process group.
        deepspeed.init_distributed(dist_backend="nccl" if has_gpu else "gloo")
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.run_lock = self._lock_run_dir()  # before anything in out_dir is read or written
        self._log_batch(pre)

        # The objective mix, objective parameters and source weights by step (launch/train/schedules.py).
        self.schedules = build_schedules(cfg)
        self.schedules.rope = (self.enc_cfg.global_rope_theta, self.enc_cfg.local_rope_theta)  # init_from's too
        torch.manual_seed(cfg.train.seed)
        model = self._build_model(pre)
        self.stream, self.data_identity = self._build_stream(pre)
        # Before initialize: a checkpoint from another world size needs DeepSpeed's universal loading switched on.
        self.resume_plan = plan_resume(self.ckpt_dir, self.world, self.rank, pre.ds_config, self.data_identity,
                                       cfg.to_dict())
        self.engine, self.scheduler = self._build_engine(model, pre.ds_config)
        self.mixer, self.objectives = self._build_objectives()
        self.step = 0
        self.tokens_seen = 0
        self._boundary: StreamBoundary | None = None  # see _prefetch
        self.skipped_steps = self.skipped_micro_batches = self.bad_in_a_row = 0
        self._last_log: dict = {}
        self._last_eval: dict = {}
        faults.write_pid()
        if self.resume_plan is not None:
            self._resume(self.resume_plan)
        self.evaluator = self._build_evaluator()
        self.preempt = Preemption(self.rank, self.device)
        self.metrics = Metrics(self.out_dir, list(self.objectives), self.rank, cfg.train.max_steps, self.device,
                               {"config": cfg.to_dict(), "deepspeed": pre.ds_config}, seq_len=cfg.data.seq_len,
                               peak_tflops=cfg.train.peak_tflops)

    # -- building ------------------------------------------------------------------------------------------------
    def _lock_run_dir(self) -> RunLock | None:
        """Collective: rank 0 locks out_dir for the life of the run (launch/train/runlock.py); when another run holds
        it, rank 0 names the holder and every other rank stops with a pointer to that message."""
        lock, refused = None, ""
        if self.rank == 0:
            try:
                lock = acquire(self.out_dir)
            except RunDirLocked as e:
                refused = str(e)
        flag = torch.tensor([1.0 if refused else 0.0], device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if refused:
            raise RunDirLocked(refused)
        if flag.item():
            raise RunDirLocked(f"{self.out_dir} is in use by another run; rank 0's message names it")
        return lock

    def _log_batch(self, pre: Preflight) -> None:
        t, ds_config = self.cfg.train, pre.ds_config
        log0(self.rank, f"world {self.world} ({self.env.source}), device {self.device.type}, precision "
                        f"{pre.precision}, ZeRO stage {ds_config['zero_optimization'].get('stage', 0)}")
        tokens_per_step = t.micro_batch_size * t.grad_accum * self.world * self.cfg.data.seq_len
        log0(self.rank, f"batch: micro {t.micro_batch_size} x accum {t.grad_accum} x world {self.world} = "
                        f"{ds_config['train_batch_size']} rows x {self.cfg.data.seq_len} tokens = "
                        f"{tokens_per_step} tokens/step"
             + ("; train.batch_warmup and data.seq_len_phases move it (--dry-run prints the phases)"
                if t.batch_warmup is not None or self.cfg.data.seq_len_phases else ""))

    def _head_loss(self) -> str:
        if self.cfg.train.head_loss == "fused" and self.zero_stage == 3:
            warn("train.head_loss=fused is ignored under ZeRO-3 (it reads the decoder weight outside the decoder's "
                 "forward, where ZeRO-3 has not gathered it); using plain")
            return "plain"
        return self.cfg.train.head_loss

    def _build_model(self, pre: Preflight) -> EncoderForPretraining:
        """The model, initialised (or from model.init_from's folder), with activation checkpointing and
        torch.compile as configured; not yet DeepSpeed's."""
        from model.heads import EncoderForPretraining

        t = self.cfg.train
        head_loss = self._head_loss()
        model = EncoderForPretraining(self.enc_cfg, attn_backend=t.attention_backend, head_loss=head_loss)
        if pre.init_from:  # the same folder on every rank, before DeepSpeed partitions the weights
            from launch.train.init_from import initialise

            initialise(model, pre.init_from, self.ckpt_dir, lambda m: log0(self.rank, m))
        # Outside any compiled layer: _compile compiles the blocks the checkpoint wrapper calls.
        model.encoder.set_activation_checkpointing(t.recompute_every())
        if t.recompute_every():
            log0(self.rank, f"activation checkpointing: blocks i with i % {t.recompute_every()} == 0 are recomputed "
                            "in the backward pass")
        if t.compile:
            self._compile(model, head_loss)
        n_params = sum(p.numel() for p in model.parameters())
        log0(self.rank, f"model: {n_params / 1e6:.2f}M parameters ({self.enc_cfg.num_layers} layers, "
                        f"hidden {self.enc_cfg.hidden_size}, vocab {pre.tokenizer.vocab_size}); attention backend "
                        f"{t.attention_backend}" + (" (sdpa on this device)" if t.attention_backend == "auto"
                                                    and self.device.type != "cuda" else "")
                        + f", head loss {head_loss}")
        return model

    def _compile(self, model: EncoderForPretraining, head_loss: str) -> None:
        from model.encoder import compile_layers
        from model.head_loss import compile_chunk

        # ZeRO-3 hooks gather each layer's parameters around its forward; a full graph would have to trace them.
        n = compile_layers(model, fullgraph=self.zero_stage != 3)
        if head_loss == "fused":
            compile_chunk()
        log0(self.rank, f"torch.compile: {n} encoder layers" + (" and the fused head loss's chunk"
                                                                 if head_loss == "fused" else "")
             + " (compiled at their first forward)")

    def _build_stream(self, pre: Preflight) -> tuple[Any, dict]:
        """This rank's data loader over every source, and the identity of that data (what resuming must not
        change, launch/train/resume.py)."""
        from data.loader import build_loader

        d, t = self.cfg.data, self.cfg.train
        sources = [(k, float(v)) for k, v in d.sources.items()] or [(d.path, 1.0)]
        knots, between = self.schedules.data_knots(self.world)
        stream = build_loader(sources, seq_len=d.seq_len, batch_size=t.micro_batch_size, rank=self.rank,
                              world_size=self.world, seed=t.seed, num_workers=d.num_workers,
                              on_bad_data=d.on_bad_data, shuffle_window_shards=d.shuffle_window_shards,
                              schedule=knots, schedule_between=between, shapes=self.schedules.shape_knots(self.world),
                              **self.read_options())
        if stream.manifest.tokenizer_sha256 != self.manifest.tokenizer_sha256:
            raise ConfigError([f"data.sources were prepared with another tokenizer than data.path ({d.path}); "
                               f"prepare every source with `launch.prepare --tokenizer {pre.tokenizer.path}`"])
        identity = data_identity(self.manifest.tokenizer_sha256,
                                 [(spec, src.manifest) for (spec, _), src in zip(sources, stream.sources, strict=True)])
        return stream, identity

    def _build_engine(self, model: EncoderForPretraining, ds_config: dict) -> tuple[Any, Any]:
        """DeepSpeed's engine around the model, cloze's optimizer and schedule; returns (engine, scheduler)."""
        import deepspeed

        optimizer = build_optimizer(model, self.cfg.train)
        t = self.cfg.train
        scheduler = build_scheduler(optimizer, t, self.schedules.lr_progress if t.lr_follows == "tokens" else None)
        _import_deepspeed_muon_uncompiled()
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        return engine, scheduler

    def _build_objectives(self) -> tuple[Any, dict[str, Any]]:
        """The mixer (which objective each micro-batch gets, following objectives.schedule) and each objective of
        the mix by name (its scheduled parameters are applied per micro-batch in _fetch)."""
        return self.schedules.mixer(self.cfg.train.seed), self.schedules.objectives(self.cfg.objectives.mode_tokens)

    def read_options(self) -> dict[str, Any]:
        """How remote shards are read (bounds, the node's shard cache): the same for training and evaluation."""
        d = self.cfg.data
        return {"read_stall_s": d.read_stall_s, "read_timeout_s": d.read_timeout_s, "cache_dir": d.cache_dir,
                "cache_max_bytes": int(d.cache_max_gb * 2**30)}

    def _build_evaluator(self) -> Any:
        if not self.cfg.eval.path:
            return None
        from launch.train.evaluate import Evaluator

        e = self.cfg.eval
        return Evaluator(e.path, self.cfg.data.seq_len, self.cfg.train.micro_batch_size, e.batches, self.rank,
                         self.world, self.tok_info, seed=e.seed, mode_tokens=self.cfg.objectives.mode_tokens,
                         **self.read_options())

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _run_info(self) -> dict:
        return {"config": self.cfg.to_dict(), "config_hash": config_hash(self.cfg),
                "encoder": self.enc_cfg.to_dict(), "world_size": self.world, "zero_stage": self.zero_stage,
                "seq_len": self.schedules.phase_at(max(0, self.step - 1)).seq_len,  # of the last step trained
                "step": self.step, "tokens_seen": self.tokens_seen, "hardware": self.hardware,
                "manifest": str(Path(self.cfg.data.path).resolve()), "data_identity": self.data_identity}

    def _rank_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rank": self.rank, "world_size": self.world,
                "config_hash": config_hash(self.cfg), "stream": self._stream_state(),
                "skipped_steps": self.skipped_steps,
                "mixer": self.mixer.state_dict(), "consumed_shards": self._consumed_shards()}

    # The stream as of the end of the last step: from the boundary snapshot taken before the next step's first
    # micro-batch was prefetched (_prefetch), or live when nothing was prefetched.
    def _stream_state(self) -> dict:
        return self._boundary.state if self._boundary else self.stream.state_dict()

    def _consumed_shards(self) -> list[str]:
        shards = list(self.stream.consumed_shards)
        return shards[: self._boundary.consumed] if self._boundary else shards

    def _stream_stats(self) -> dict[str, int]:
        return dict(self._boundary.stats) if self._boundary else self.stream.stats()

    def _weights_finite(self) -> bool:
        """Collective: every rank's weights (its ZeRO-3 partition, else the module's own copy) are finite. A gradient
        can be non-finite while the loss was finite (the loss guard cannot see it); the step then writes NaN into
        the weights, and a checkpoint of those would replace a good one."""
        local = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        bad = torch.stack([~torch.isfinite(x).all() for x in local if x.numel()]).any().float().reshape(1)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def save(self) -> str:
        if not self._weights_finite():
            latest = checkpoint.read_latest(self.ckpt_dir, warn=False)
            raise TrainingHalted(
                f"the weights are non-finite after step {self.step} (a non-finite gradient with a finite loss); "
                f"no checkpoint written, so the last good one stays: "
                f"{self.ckpt_dir / latest if latest else 'none yet'}. Resume from it with a lower train.lr or "
                f"train.grad_clip, or check the data around this position")
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, self._rank_state(), self._run_info(),
                              self.tokenizer_model, self.cfg.train.keep_checkpoints, self.faults)
        log0(self.rank, f"checkpoint {self.ckpt_dir / tag}")
        return tag

    def _resume(self, plan: ResumePlan) -> None:
        """Weights, optimizer and schedule from the checkpoint, then the step, counters, mixer and data position."""
        load_engine(self.engine, plan.load_dir, plan.tag)
        # This rank's own state, or old rank 0's in a reshaped world (step, tokens and mixer agree on every rank).
        state = plan.states[0]
        self.mixer.load_state_dict(state["mixer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self._resume_stream(plan, state)

    def _resume_stream(self, plan: ResumePlan, state: dict) -> None:
        where = self.ckpt_dir / plan.tag
        if plan.reshaped:  # the loader's position is global: any old rank's state continues it exactly
            self.stream.load_reshaped([s["stream"] for s in plan.states])
            log0(self.rank, f"resumed from {where} at step {self.step} on {self.world} ranks "
                            f"(written by {plan.old_world}): the data continues at global row {self.stream.rows()}")
        else:
            self.stream.load_state_dict(state["stream"])
            log0(self.rank, f"resumed from {where} at step {self.step}")

    # -- helpers of the step ---------------------------------------------------------------------------------------
    def _to_device(self, batch: Batch | torch.Tensor) -> Any:
        """The batch's tensors on the training device. On a GPU they are copied from pinned memory without
        blocking, so the copy of the prefetched batch overlaps the forward that is running (see _prefetch)."""
        import dataclasses

        cuda = self.device.type == "cuda"

        def move(x):
            if not isinstance(x, torch.Tensor):
                return x
            return (x.pin_memory() if cuda else x).to(self.device, non_blocking=cuda)

        if isinstance(batch, torch.Tensor):
            return move(batch)
        return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})

    def _forward(self, batch: Batch, label_positions: torch.Tensor | None = None) -> PretrainOutput:
        return self.engine(input_ids=batch.input_ids, labels=batch.labels, doc_ids=batch.doc_ids,
                           attention=batch.attention, prefix_len=batch.prefix_len, label_positions=label_positions)

    def _data_stats(self) -> dict[str, int]:
        """The loader's counters (skipped shards/samples by reason, tokens per source) summed over ranks."""
        stats = self._stream_stats()
        if not (dist.is_initialized() and self.world > 1):
            return stats
        every: list = [None] * self.world  # ranks may hold different keys (a skip seen by one rank only)
        dist.all_gather_object(every, stats)
        total: dict[str, int] = {}
        for rank_stats in every:
            for k, v in rank_stats.items():
                # Counters add up over ranks; an epoch is a position, so keep the furthest.
                total[k] = max(total.get(k, 0), v) if k.startswith("epoch/") else total.get(k, 0) + v
        return total

    def _null_batch(self, batch: Batch) -> Batch:
        from objectives.batch import IGNORE_INDEX, Batch

        ids = torch.full_like(batch.input_ids, self.tok_info.pad_id)
        return Batch(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), doc_ids=torch.zeros_like(ids),
                     attention="bidirectional", objective="null")

    def _read_scalars(self, out: PretrainOutput, loss: torch.Tensor) -> tuple[bool, float, int, int]:
        """The micro-step's one host synchronisation: whether the loss is finite on every rank (collective: all
        ranks must skip together), and the loss, label and correct counts for the metrics, read in one copy.
        It comes after the forward and before the backward is queued, so it waits for the forward only; reading
        any of these after the backward was queued would make the host wait for the backward as well."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)  # on the device: NCCL reduces GPU tensors only
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        flag, value, labels, correct = torch.cat(
            [bad, loss.detach().float().reshape(1), out.num_labels.float().reshape(1),
             out.num_correct.float().reshape(1)]).tolist()
        return flag == 0.0, value, int(labels), int(correct)

    # -- one step, piece by piece ----------------------------------------------------------------------------------
    def _fetch(self, it: Iterator, step: int, micro: int) -> MicroBatch:
        """Micro-batch (step, micro): read from the stream and masked by the objective the mixer picks for it. The
        CPU work of the next micro-batch runs while the device computes the current backward (see _prefetch)."""
        from model.attention import visible_pairs
        from objectives import step_generator
        from objectives.batch import IGNORE_INDEX

        t = self.cfg.train
        name = self.mixer.choose(self.schedules.micro_start(step) + micro)
        tw = time.perf_counter()
        rows, doc_ids = next(it)
        wait = time.perf_counter() - tw
        objective = self.schedules.objective_at(self.objectives[name], step, micro)
        batch = objective(rows, doc_ids, step_generator(t.seed, self.rank, step, micro), self.tok_info)
        # The host copy stays for the mixer's counts, which would otherwise read the device (a synchronisation).
        positions = (batch.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # on the host: no device wait
        on_device = self._to_device(batch)
        pairs = visible_pairs(batch.attention, batch.doc_ids, batch.prefix_len)
        local_pairs = visible_pairs(batch.attention, batch.doc_ids, batch.prefix_len,
                                    window=self.enc_cfg.local_attention) if self.enc_cfg.num_local_layers else None
        return MicroBatch(objective=name, host=batch, device=on_device, label_positions=self._to_device(positions),
                          tokens=rows.numel(), wait_s=wait, pairs=pairs, local_pairs=local_pairs)

    def _forward_backward(self, current: MicroBatch, micro: int) -> float | None:
        """Forward and backward of one micro-batch of step self.step + 1; returns its loss, or None when the loss
        was not finite on some rank: every rank then backwards a null batch instead, which adds no gradient."""
        self.mixer.record(current.objective, current.host)
        out = self._forward(current.device, current.label_positions)
        loss = self.faults.loss(out.loss, self.step + 1, micro)
        finite, value, num_labels, num_correct = self._read_scalars(out, loss)
        if not finite:
            # Keep DeepSpeed's accumulation counters and every rank's collectives in step: backward a loss that is
            # exactly 0 on a harmless batch (all [PAD], no labels) instead of the bad one.
            self.skipped_micro_batches += 1
            self.engine.backward(self._forward(self._null_batch(current.device)).loss)
            return None
        with self.faults.gradient(self.engine.module.encoder.final_norm.weight, self.step + 1, micro):
            self.engine.backward(loss)
        flops = self.enc_cfg.useful_flops(current.tokens, current.pairs, num_labels, current.local_pairs)
        self.metrics.micro(current.objective, value, num_labels, num_correct, current.tokens, current.wait_s, flops)
        return value

    def _prefetch(self, it: Iterator, micro: int, accum: int) -> MicroBatch | None:
        """The micro-batch after micro-batch `micro` of this step (None after the last step's last). The backward
        is queued on the device, not finished: reading, masking and the copy to the device run while it does.
        Across a step boundary the stream's position is remembered first: a checkpoint after this step must not
        count the prefetched batch as consumed."""
        t = self.cfg.train
        if micro + 1 < accum:
            return self._fetch(it, self.step, micro + 1)
        if self.step + 1 < t.max_steps:
            self._boundary = StreamBoundary(state=self.stream.state_dict(), consumed=len(self.stream.consumed_shards),
                                            stats=self.stream.stats())
            return self._fetch(it, self.step + 1, 0)
        return None

    def _set_shape(self) -> int:
        """What this step's phase and batch warm-up set (launch/train/phases.py, train.batch_warmup): the engine's
        micro-batch and accumulation (so its backward scales each micro-batch's loss by the step's own
        accumulation) and the model's RoPE bases. Returns the step's micro-batches."""
        accum, phase = self.schedules.accum_at(self.step), self.schedules.phase_at(self.step)
        engine = self.engine
        if phase.micro_batch_size != engine.train_micro_batch_size_per_gpu():
            engine.set_train_micro_batch_size(phase.micro_batch_size)
        if accum != engine.gradient_accumulation_steps():
            engine.set_train_batch_size(phase.micro_batch_size * accum * self.world)
        rope = self.schedules.rope_at(self.step)
        if rope != (self.enc_cfg.global_rope_theta, self.enc_cfg.local_rope_theta):
            self.enc_cfg = dataclasses.replace(self.enc_cfg, global_rope_theta=rope[0], local_rope_theta=rope[1])
            engine.module.set_rope_theta(*rope)
            log0(self.rank, f"step {self.step + 1}: RoPE bases global {rope[0]:g}, local {rope[1]:g}")
        if phase.seq_len != self.metrics.seq_len:
            self.metrics.seq_len = phase.seq_len
            log0(self.rank, f"step {self.step + 1}: rows of {phase.seq_len} tokens, {phase.micro_batch_size} per "
                            f"micro-batch (data.seq_len_phases)")
        return accum

    def _apply_update(self) -> None:
        """engine.step(): DeepSpeed applies the update at the accumulation boundary (and only counts before it)."""
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if self.engine.skipped_steps > skipped_before:
            # ZeRO-1/2 (fp32, and bf16 with check_grad_overflow) skip an update whose gradient norm is not finite,
            # on every rank alike; the loss guard cannot see that case (the loss was finite).
            log0(self.rank, f"step {self.step + 1}: non-finite gradient norm; DeepSpeed skipped the update "
                            f"({self.engine.skipped_steps} in all)")

    def _train_step(self, it: Iterator, upcoming: MicroBatch) -> tuple[MicroBatch | None, dict[str, float], bool]:
        """Every micro-batch of step self.step + 1, starting from the prefetched `upcoming`. Returns the next
        step's first micro-batch (prefetched), the loss per objective, and whether a micro-batch was skipped."""
        losses: dict[str, float] = {}
        skipped = False
        self._boundary = None
        accum = self._set_shape()
        for micro in range(accum):
            if self.cfg.train.batch_warmup is not None:  # the engine counts micro-steps modulo its accumulation
                self.engine.set_gradient_accumulation_boundary(micro == accum - 1)
            current = upcoming
            value = self._forward_backward(current, micro)
            upcoming = self._prefetch(it, micro, accum)
            self._apply_update()
            self.tokens_seen += current.tokens * self.world
            if value is None:
                skipped = True
            else:
                losses[current.objective] = value
        return upcoming, losses, skipped

    def _count_skipped(self, skipped: bool) -> None:
        """Count a step with a skipped micro-batch; halt after train.max_bad_steps of them in a row."""
        if not skipped:
            self.bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        log0(self.rank, f"step {self.step + 1}: non-finite loss; its micro-batch contributed no gradient "
                        f"({self.bad_in_a_row} in a row, {self.skipped_steps} in all)")
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingHalted(
                f"{self.bad_in_a_row} steps in a row with a non-finite loss (last: step {self.step + 1}); "
                f"halting. Resume from the last checkpoint ({self.ckpt_dir}) with a lower train.lr, or "
                f"check the data around this position")

    def _after_step(self, start: int, losses: dict[str, float]) -> dict | None:
        """The work between two steps: metrics, evaluation, then stop, preemption or a periodic checkpoint.
        Returns the launch's summary when the run stops here."""
        self._log_step(start, losses)
        self._maybe_evaluate()
        return self._stop_or_checkpoint()

    def _log_step(self, start: int, losses: dict[str, float]) -> None:
        t = self.cfg.train
        lr = self.scheduler.get_last_lr()[0]
        scheduled = self.schedules.values_at(self.step - 1)  # the values the step just taken trained with
        record = {"loss": losses, "lr": lr, **({"schedule": scheduled} if scheduled else {})}
        self.metrics.step_record(self.step, record)
        if self.step % t.log_every == 0 or self.step == t.max_steps:
            gn = self.engine.get_global_grad_norm()
            self._last_log = self.metrics.log(self.step, lr, None if gn is None else float(gn), start, scheduled)
            self.metrics.data(self.step, self._data_stats())

    def _maybe_evaluate(self) -> None:
        if self.evaluator and (self.step % self.cfg.eval.every == 0 or self.step == self.cfg.train.max_steps):
            self._last_eval = self.evaluator.run(self.engine, self.device)
            self.metrics.write(self.step, self._last_eval)

    def _stop_or_checkpoint(self) -> dict | None:
        """Before the last step (whose checkpoint `train` writes): stop at train.stop_at or on a preemption signal
        (checkpoint, then a summary), or write the periodic checkpoint."""
        t = self.cfg.train
        if self.step >= t.max_steps:
            return None
        if self.step == t.stop_at:
            self.save()
            log0(self.rank, f"stopped at step {self.step} (train.stop_at); run again to resume")
            return {"steps": self.step, "stopped": True}
        if self.preempt.requested():
            self.save()
            why = self.preempt.signal_name or "a signal to another rank"
            log0(self.rank, f"stopped at step {self.step} on {why}")
            self.preempt.after_checkpoint()
            return {"steps": self.step, "preempted": True}
        if t.checkpoint_every and self.step % t.checkpoint_every == 0:
            self.save()
        return None

    # -- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        start = self.step
        if start >= t.max_steps:
            log0(self.rank, f"nothing to do: checkpoint is at step {start} >= train.max_steps {t.max_steps}")
            return {}
        it = iter(self.stream)
        self._tokens_at_launch = self.tokens_seen
        t0 = time.perf_counter()
        self.engine.train()
        upcoming: MicroBatch | None = self._fetch(it, self.step, 0)
        while self.step < t.max_steps and upcoming is not None:
            upcoming, losses, skipped = self._train_step(it, upcoming)
            self._count_skipped(skipped)
            self.step += 1
            stopped = self._after_step(start, losses)
            if stopped:
                return stopped
        return self._finish(start, t0)

    def _finish(self, start: int, t0: float) -> dict:
        """The final checkpoint, summary.json and the run summary line."""
        tag = self.save()
        wall = time.perf_counter() - t0
        tokens_now = self.tokens_seen - self._tokens_at_launch
        summary = {"steps": self.step, "steps_this_launch": self.step - start, "tokens_seen": self.tokens_seen,
                   "wall_s": round(wall, 2), "mean_tokens_per_s": round(tokens_now / max(wall, 1e-9), 1),
                   "skipped_steps": self.skipped_steps, "skipped_micro_batches": self.skipped_micro_batches,
                   "skipped_updates_nonfinite_grad": int(self.engine.skipped_steps),
                   "data": self._data_stats(),
                   "final": self._last_log, "eval": self._last_eval, "objectives": self.mixer.counts(),
                   "checkpoint": str(self.ckpt_dir / tag), "tensorboard": str(self.out_dir / "tensorboard")}
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            self.metrics.hparams(self.cfg, {**self._last_log, **self._last_eval})
        log0(self.rank, f"run summary: steps {start + 1}..{self.step} in {fmt_duration(wall)}, "
                        f"{summary['mean_tokens_per_s'] / 1e3:.1f}k tokens/s mean, {self.tokens_seen:,} tokens seen, "
                        f"{self.skipped_steps} steps with a skipped micro-batch; checkpoint {summary['checkpoint']}; "
                        f"summary {self.out_dir / 'summary.json'}")
        return summary

    def close(self) -> None:
        self.stream.close()
        self.metrics.close()
        self.preempt.restore()
        if self.run_lock is not None:
            self.run_lock.release()


def run(cfg: RunConfig, env: DistEnv) -> dict:
    # DeepSpeed's ZeRO reduce path still calls the deprecated all_gather_into_tensor; the warning, printed by every
    # rank at every start, tells a user nothing they can act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, env, Faults.from_env(env.rank))  # the only place the fault variables are read
    try:
        summary = trainer.train()
        # Leave together and tear the process group down explicitly: letting the interpreter destroy gloo's
        # threads at exit sometimes aborts the process ("terminate called without an active exception").
        if dist.is_initialized():
            dist.barrier()
        return summary
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()

