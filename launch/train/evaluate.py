"""Evaluation on held-out shards with a fixed set: the same rows and the same masks at every evaluation and in
every run with the same eval seed, so curves are comparable across steps and across runs.

Reported, whatever the training mix says: MLM loss and accuracy at 15% (BERT 80/10/10), span-masking loss
(SpanBERT defaults), causal loss / perplexity, and prefix-LM loss / perplexity (the split drawn uniformly within
20-80% of each row, next-token loss after it under prefix attention). A run trained with mode tokens
(objectives.mode_tokens) is evaluated with them too: each objective's rows start with its mode token, exactly as
in training, so the held-out numbers measure the model as it was trained to be used. The set and its masks do not
depend on the world size; each rank evaluates its share of the set's batches (data/evalset.py) and the sums are
all-reduced, so the numbers do not depend on how the set was split.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# Append new objectives at the end: each one's masks are drawn from its position, so the others' stay the same.
EVAL_OBJECTIVES = {"mlm": {"rate": 0.15}, "span": {"rate": 0.15, "p": 0.2, "max_span": 10}, "causal": {},
                   "prefix": {"min_frac": 0.2, "max_frac": 0.8}}
LANGUAGE_MODELS = ("causal", "prefix")
"""Objectives whose loss is a next-token loss, so their perplexity is reported too."""


class Evaluator:
    def __init__(self, path: str, seq_len: int, batch_size: int, batches: int, rank: int, world: int,
                 tok_info, seed: int = 0, mode_tokens: bool = False, **read):
        from data.evalset import eval_share
        from objectives import build_objective, step_generator

        # Materialise the fixed set once: this rank's share of `batches` micro-batches, each objective with its own
        # fixed masks, seeded by the batch's place in the whole set (not by the rank).
        share = eval_share(path, seq_len, batch_size, batches, rank, world, seed, **read)
        self.counted = [b.counted for b in share]
        objectives = {name: build_objective(name, params, mode_tokens=mode_tokens)
                      for name, params in EVAL_OBJECTIVES.items()}
        self.sets: dict[str, list] = {name: [] for name in objectives}
        for b in share:
            for j, (name, objective) in enumerate(objectives.items()):
                gen = step_generator(seed, 0, b.index, j)
                self.sets[name].append(objective(b.input_ids, b.doc_ids, gen, tok_info))
        self.rows = sum(self.counted) * batch_size

    @torch.no_grad()
    def run(self, engine, device: torch.device) -> dict[str, float]:
        was_training = engine.training
        engine.eval()
        sums = torch.zeros(len(self.sets), 3, dtype=torch.float64)  # loss x labels, labels, correct
        for i, batches in enumerate(self.sets.values()):
            for b, counted in zip(batches, self.counted, strict=True):
                out = engine(input_ids=b.input_ids.to(device), labels=b.labels.to(device),
                             doc_ids=b.doc_ids.to(device), attention=b.attention,
                             prefix_len=None if b.prefix_len is None else b.prefix_len.to(device))
                if not counted:  # a padding batch: run (a ZeRO-3 forward is collective), never counted
                    continue
                n = float(out.num_labels)
                sums[i] += torch.tensor([out.loss.float().item() * n, n, float(out.num_correct)], dtype=torch.float64)
        if dist.is_initialized():
            sums = sums.to(device)  # NCCL reduces GPU tensors only
            dist.all_reduce(sums)
            sums = sums.cpu()
        if was_training:
            engine.train()
        result: dict[str, float] = {}
        for i, name in enumerate(self.sets):
            loss_sum, labels, correct = sums[i].tolist()
            if labels == 0:
                continue
            result[f"eval/{name}_loss"] = loss_sum / labels
            result[f"eval/{name}_accuracy"] = correct / labels
        for name in LANGUAGE_MODELS:
            if f"eval/{name}_loss" in result:
                result[f"eval/{name}_perplexity"] = math.exp(min(50.0, result[f"eval/{name}_loss"]))
        return result
