"""The pretraining loop: build every part from the validated config, train, checkpoint, close.

Randomness is a pure function of (seed, step, rank): the mixer picks the objective from (seed, micro-step), each
rank's masks come from a generator seeded by (seed, rank, micro-step), the shard order from (seed, epoch). A
resumed run therefore needs only the step and the loader position to continue exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from launch import checkpoint
from launch.config import ConfigError, RunConfig, config_hash
from launch.dist import DistEnv
from launch.metrics import Metrics, fmt_duration
from launch.optim import build_optimizer, build_scheduler
from launch.preempt import Preemption
from launch.preflight import preflight


def log0(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[cloze] {msg}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv):
        import deepspeed

        from data.stream import PackedStream
        from model.config import EncoderConfig
        from model.heads import EncoderForPretraining
        from objectives import build_objective
        from objectives.batch import TokenInfo
        from objectives.mixer import Mixer

        self.cfg, self.env = cfg, env
        t = cfg.train
        self.rank, self.world = env.rank, env.world_size
        has_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", env.local_rank) if has_gpu else torch.device("cpu")
        # Validate everything that needs the world size or the data before the engine exists.
        pre = preflight(cfg, self.world)
        ds_config, precision, tok = pre.ds_config, pre.precision, pre.tokenizer
        self.zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
        self.manifest, self.tokenizer_dir = pre.manifest, pre.tokenizer_dir
        self.tok_info = TokenInfo(
            vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id,
            special_ids=tuple(tok.special_ids), first_ordinary_id=tok.first_ordinary_id,
            mode_ids=tuple(sorted(tok.mode_ids.items())), word_start=torch.as_tensor(tok.word_start),
        )
        self.enc_cfg = EncoderConfig(
            vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, cls_token_id=tok.cls_id, sep_token_id=tok.sep_id,
            mask_token_id=tok.mask_id, **cfg.model,
        )
        # Everything above is validation a user can fix; only now start the process group.
        deepspeed.init_distributed(dist_backend="nccl" if has_gpu else "gloo")

        log0(self.rank, f"world {self.world} ({env.source}), device {self.device.type}, precision {precision}, "
                        f"ZeRO stage {ds_config['zero_optimization'].get('stage', 0)}")
        tokens_per_step = t.micro_batch_size * t.grad_accum * self.world * cfg.data.seq_len
        log0(self.rank, f"batch: micro {t.micro_batch_size} x accum {t.grad_accum} x world {self.world} = "
                        f"{ds_config['train_batch_size']} rows x {cfg.data.seq_len} tokens = "
                        f"{tokens_per_step} tokens/step")

        torch.manual_seed(t.seed)
        model = EncoderForPretraining(self.enc_cfg)
        model.init_weights()
        n_params = sum(p.numel() for p in model.parameters())
        log0(self.rank, f"model: {n_params / 1e6:.2f}M parameters ({self.enc_cfg.num_layers} layers, "
                        f"hidden {self.enc_cfg.hidden_size}, vocab {tok.vocab_size})")
        optimizer = build_optimizer(model, t)
        scheduler = build_scheduler(optimizer, t)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

        self.stream = PackedStream(cfg.data.path, seq_len=cfg.data.seq_len, batch_size=t.micro_batch_size,
                                   rank=self.rank, world_size=self.world, seed=t.seed)
        self.mixer = Mixer(dict(cfg.objectives.mix), seed=t.seed)
        self.objectives = {name: build_objective(name, dict(cfg.objectives.params.get(name) or {}),
                                                 mode_tokens=cfg.objectives.mode_tokens)
                           for name in cfg.objectives.mix}
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self._maybe_resume()
        self.evaluator = None
        if cfg.eval.path:
            from launch.evaluate import Evaluator

            self.evaluator = Evaluator(cfg.eval.path, cfg.data.seq_len, t.micro_batch_size, cfg.eval.batches,
                                       self.rank, self.world, self.tok_info, seed=cfg.eval.seed)
        self.preempt = Preemption(self.rank)
        self.metrics = Metrics(self.out_dir, list(self.objectives), self.rank, t.max_steps,
                               {"config": cfg.to_dict(), "deepspeed": ds_config})

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _run_info(self) -> dict:
        return {"config": self.cfg.to_dict(), "config_hash": config_hash(self.cfg),
                "encoder": self.enc_cfg.to_dict(), "world_size": self.world, "zero_stage": self.zero_stage,
                "step": self.step, "tokens_seen": self.tokens_seen,
                "manifest": str(Path(self.cfg.data.path).resolve())}

    def _rank_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rank": self.rank, "world_size": self.world,
                "config_hash": config_hash(self.cfg), "stream": self.stream.state_dict(),
                "mixer": self.mixer.state_dict(), "consumed_shards": list(self.stream.consumed_shards)}

    def save(self) -> str:
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, self._rank_state(), self._run_info(),
                              self.tokenizer_dir, self.cfg.train.keep_checkpoints)
        log0(self.rank, f"checkpoint {self.ckpt_dir / tag}")
        return tag

    def _maybe_resume(self) -> None:
        tag = checkpoint.read_latest(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        if tag is None:
            return
        info = checkpoint.load_run_info(self.ckpt_dir, tag)
        if info["world_size"] != self.world:
            raise ConfigError([f"checkpoint {self.ckpt_dir / tag} was written by {info['world_size']} ranks, this run "
                               f"has {self.world}; resuming on another world size is not supported yet"])
        state = checkpoint.load_rank_state(self.ckpt_dir, tag, self.rank)
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {self.ckpt_dir / tag}")
        self.stream.load_state_dict(state["stream"])
        self.mixer.load_state_dict(state["mixer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        log0(self.rank, f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    # -- training ------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from objectives import step_generator

        t = self.cfg.train
        start = self.step
        if start >= t.max_steps:
            log0(self.rank, f"nothing to do: checkpoint is at step {start} >= train.max_steps {t.max_steps}")
            return {}
        it = iter(self.stream)
        t0 = time.perf_counter()
        last: dict = {}
        last_eval: dict = {}
        self.engine.train()
        while self.step < t.max_steps:
            step_losses = {}
            for micro in range(t.grad_accum):
                micro_step = self.step * t.grad_accum + micro
                name = self.mixer.choose(micro_step)
                tw = time.perf_counter()
                rows, doc_ids = next(it)
                wait = time.perf_counter() - tw
                gen = step_generator(t.seed, self.rank, self.step, micro)
                batch = self.objectives[name](rows, doc_ids, gen, self.tok_info)
                self.mixer.record(name, batch)
                out = self.engine(
                    input_ids=batch.input_ids.to(self.device), labels=batch.labels.to(self.device),
                    doc_ids=batch.doc_ids.to(self.device), attention=batch.attention,
                    prefix_len=None if batch.prefix_len is None else batch.prefix_len.to(self.device))
                self.engine.backward(out.loss)
                self.engine.step()
                loss = out.loss.item()
                step_losses[name] = loss
                self.tokens_seen += rows.numel() * self.world
                self.metrics.micro(name, loss, int(out.num_labels), int(out.num_correct), rows.numel(), wait)
            self.step += 1
            lr = self.scheduler.get_last_lr()[0]
            self.metrics.step_record(self.step, {"loss": step_losses, "lr": lr})
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                gn = self.engine.get_global_grad_norm()
                last = self.metrics.log(self.step, lr, None if gn is None else float(gn), start)
            if self.evaluator and (self.step % self.cfg.eval.every == 0 or self.step == t.max_steps):
                last_eval = self.evaluator.run(self.engine, self.device)
                self.metrics.write(self.step, last_eval)
            if self.step == t.stop_at and self.step < t.max_steps:
                self.save()
                log0(self.rank, f"stopped at step {self.step} (train.stop_at); run again to resume")
                return {"steps": self.step, "stopped": True}
            if self.step < t.max_steps and self.preempt.requested():
                self.save()
                why = self.preempt.signal_name or "a signal to another rank"
                log0(self.rank, f"stopped at step {self.step} on {why}")
                self.preempt.after_checkpoint()
                return {"steps": self.step, "preempted": True}
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                self.save()
        self.save()
        wall = time.perf_counter() - t0
        log0(self.rank, f"trained steps {start + 1}..{self.step} in {fmt_duration(wall)}; "
                        f"tokens seen {self.tokens_seen}")
        summary = {"steps": self.step, "tokens_seen": self.tokens_seen, "wall_s": wall, "final": last,
                   "eval": last_eval,
                   "checkpoint": str(self.ckpt_dir), "tensorboard": str(self.out_dir / "tensorboard")}
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary

    def close(self) -> None:
        self.metrics.close()
        self.preempt.restore()


def run(cfg: RunConfig, env: DistEnv) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, env)
    try:
        return trainer.train()
    finally:
        trainer.close()

