"""The training config: typed sections, YAML + `key=value` overrides, and up-front validation.

Validation collects every problem and raises one `ConfigError` listing them all, so a user fixes a config in one
round instead of one error per launch. Checks that need other parts (the objective registry, the model config, the
data manifest) run here too, before any process group or engine exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import reprlib
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

MAX_SHOWN = 200
"""Characters of a value an error message shows; the rest is cut (a value can be megabytes long)."""
MAX_LINE = 600
"""Characters of one problem line: a backstop for messages that quote a value without `shown`."""
MAX_PROBLEMS = 20
"""Problems listed in one error; the rest are counted."""
MAX_DEPTH = 50
"""Nesting levels a YAML config or override may have (cloze's own configs use 4)."""
MAX_EXPANDED = 1_000_000
"""Nodes plus scalar characters a YAML config or override may hold once its aliases are expanded: a few hundred
bytes of nested aliases ("billion laughs") would otherwise expand to gigabytes wherever the value is printed."""
LINE_BREAKS = "\n\r\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
"""Characters that end a line (for Python's splitlines or a shell) or a C string; no config value or path may hold
one, as it would split the line of a generated sbatch script it is written into."""

# The settings that take one of a few values. Each Literal is the one list of them: validation and its error message
# read the values from it (typing.get_args).
OnBadData = Literal["fail", "skip"]
"""The same values as data.reader.ON_BAD_DATA."""
Schedule = Literal["warmup_linear", "warmup_cosine", "wsd"]
Precision = Literal["auto", "fp32", "bf16"]
AttentionBackend = Literal["auto", "sdpa", "flex"]
"""The same values as model.attention.ATTENTION_BACKENDS (model/ does not import launch/)."""
ActivationCheckpointing = Literal["none", "full", "every_n"]
LrFollows = Literal["steps", "tokens"]
HeadLoss = Literal["plain", "fused"]
"""The same values as model.head_loss.HEAD_LOSSES."""
ZeroStage = Literal[0, 1, 2, 3]

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_SHOWN
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 4, 8, 8


def shown(value: Any) -> str:
    """repr(value) for an error message, at most MAX_SHOWN characters; never builds the whole repr of a large value."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _clip(line: str) -> str:
    """One problem line of at most MAX_LINE characters, keeping its end (which usually names the fix)."""
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 160] + " ... " + line[-155:]


class ConfigError(ValueError):
    """A user mistake in the config; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        source = _clip(source)
        if len(problems) == 1:
            super().__init__(f"{source}: {_clip(problems[0])}")
        else:
            listed = [f"\n  - {_clip(p)}" for p in problems[:MAX_PROBLEMS]]
            if len(problems) > MAX_PROBLEMS:
                listed.append(f"\n  - and {len(problems) - MAX_PROBLEMS} more")
            super().__init__(f"{source}: {len(problems)} problems" + "".join(listed))


def line_break(text: str) -> str | None:
    """The first line break or NUL in `text`, escaped for a message (e.g. '\\n'), or None."""
    for c in text:
        if c in LINE_BREAKS:
            return repr(c)[1:-1]
    return None


def one_line_problem(name: str, text: str) -> str | None:
    """A problem line naming `name` when `text` holds a line break or NUL, else None."""
    found = line_break(text)
    if found is None:
        return None
    return (f"{name}: {shown(text)} holds a line break or NUL ({found}); paths, names and values must be one line "
            f"(each is written into one line of the job script)")


# -- bounded YAML ------------------------------------------------------------------------------------------------

class YAMLTooLarge(yaml.composer.ComposerError):
    """A YAML document nested deeper than MAX_DEPTH, larger than MAX_EXPANDED once expanded, or recursive."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two bounds: nesting depth (each level is a Python recursion in the composer, so
    thousands of `[` raise RecursionError) and the size of the document once its aliases are expanded."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YAMLTooLarge(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Raise YAMLTooLarge when the node graph, with every alias expanded, is deeper than MAX_DEPTH, larger than
    MAX_EXPANDED, or recursive. Counted per node once (memoised), so a bomb is refused in time linear in its text."""
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)
    active: set[int] = set()

    def visit(node: yaml.Node) -> tuple[int, int]:
        # An alias always follows its anchor in the document, and children are visited in document order: a node
        # met twice is memoised or is an ancestor (a recursive alias). Recursion here is as deep as the text's own.
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise YAMLTooLarge(None, None, "an alias refers to its own anchor (a recursive value)",
                                              node.start_mark)
        active.add(key)
        if isinstance(node, yaml.ScalarNode):
            children: list[yaml.Node] = []
            size = 1 + len(node.value)
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            size = 1
        depth = 1
        for child in children:
            s, d = visit(child)
            size, depth = size + s, max(depth, d + 1)
            if size > MAX_EXPANDED or depth > MAX_DEPTH:
                what = (f"nested deeper than {MAX_DEPTH} levels" if depth > MAX_DEPTH else
                        f"larger than {MAX_EXPANDED:,} nodes and characters")
                raise YAMLTooLarge(None, None, f"{what} once its aliases are expanded",
                                                  child.start_mark)
        active.discard(key)
        memo[key] = (size, depth)
        return memo[key]

    visit(root)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one short line: what and where, without PyYAML's multi-line context."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if not problem:
        return _clip(str(e).splitlines()[0] if str(e) else type(e).__name__)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(e, YAMLTooLarge):
        return f"refused: {problem}{where}; a cloze config is a few levels of plain values"
    return _clip(f"not valid YAML: {problem}{where}")


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, within MAX_DEPTH and MAX_EXPANDED; raises yaml.YAMLError."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # a bound above should make this unreachable; never a traceback either way
        raise YAMLTooLarge(None, None, f"nested deeper than {MAX_DEPTH} levels", None) from None
    finally:
        loader.dispose()


@dataclass
class DataConfig:
    path: str = "runs/demo/data"
    """Directory written by `python -m launch.prepare` (manifest.json, shards, tokenizer). Its tokenizer is the
    run's; it is also the only source unless `sources` is set."""
    sources: dict[str, float] = field(default_factory=dict)
    """Several sources mixed by token share, e.g. {runs/web: 0.7, runs/code: 0.3}; each a prepared directory, an
    http(s):// base URL or a pipe: command, all prepared with the same tokenizer as `path`. Empty: {path: 1.0}.
    With `schedule`, these are the weights at step 0."""
    schedule: list[Any] | dict[str, Any] | None = None
    """Knots of the source mix after step 0, values weight mappings over the keys of `sources` (a source left out
    weighs 0 there), e.g. more of a high-quality source in the final decay: {hold: [[90%, {runs/web: 0.3,
    runs/books: 0.7}]]}; a plain knot list moves the weights linearly. The loader follows it row by row (a knot
    at step s takes effect at global row s x micro x accum x world). Syntax: launch/train/schedules.py. Part of
    the data order: resume with the same schedule, train.max_steps and global batch. None: a fixed mix."""
    seq_len: int = 128
    """Tokens per row (of the first phase, with seq_len_phases)."""
    seq_len_phases: list[Any] | None = None
    """Later phases of the row length, e.g. [{at: 90%, seq_len: 8192, micro_batch_size: 4, global_rope_theta:
    160000}]: from step `at` rows have seq_len tokens, a rank's micro-batch micro_batch_size rows (default: the
    first phase's tokens per micro-batch) and the model the given RoPE bases (launch/train/phases.py). The loader
    switches without losing or repeating a document; part of the data order, like schedule. None: one length."""
    num_workers: int = 0
    """Loader worker processes per rank (0: read in the training process). Not part of the data order: a run may
    resume with another value (or another world size) and continues at the exact next row."""
    shuffle_window_shards: int = 4
    """Documents are shuffled across windows of this many consecutive shards (of each epoch's seeded shard
    order); 1 shuffles inside each shard only. Memory bound: each reader (every rank, or each of its loader
    workers) holds one window per source, up to this many x the shard size (launch.prepare --shard-bytes, 64 MiB
    by default). Part of the data order: resume with the same value."""
    on_bad_data: OnBadData = "fail"
    """'fail': a corrupt or foreign shard or sample stops the run naming it; 'skip': skip it, count it, report the
    counts in the metrics and the run summary."""
    read_stall_s: float = 30.0
    """A read from an http(s) or pipe: source that receives nothing for this many seconds is stopped (the server
    or command is dead): a shard then counts as missing (on_bad_data decides), a manifest or tokenizer is an error."""
    read_timeout_s: float = 300.0
    """A read of one file (shard, manifest, tokenizer) from an http(s) or pipe: source not finished after this many
    seconds is stopped, with the same consequences."""
    cache_dir: str = ""
    """Folder for a node-local cache of verified shards of http(s) and pipe: sources (data and eval), shared by the
    node's ranks and loader workers: a shard is fetched once, later epochs read the cache. Empty: no cache."""
    cache_max_gb: float = 64.0
    """Size bound of cache_dir in GiB; least recently used shards are evicted past it."""


@dataclass
class EvalConfig:
    path: str = ""
    """Held-out shards (`launch.prepare ... --out`): a prepared directory, an http(s):// URL or a pipe: command, any
    number of shards; empty disables evaluation."""
    every: int = 100
    """Steps between evaluations (and one at the end)."""
    batches: int = 4
    """Micro-batches (of train.micro_batch_size rows) in the fixed evaluation set, in all: the ranks split them, so
    the set, its masks and the result do not depend on the world size."""
    seed: int = 0
    """Fixes the evaluation rows and masks; keep it equal across runs you want to compare."""


@dataclass
class ObjectivesConfig:
    mix: dict[str, float] = field(default_factory=lambda: {"mlm": 0.8, "span": 0.1, "causal": 0.1})
    """Objective name -> weight; weights are normalised, so {mlm: 8, causal: 2} means 80% / 20% of micro-batches."""
    schedule: list[Any] | dict[str, Any] | None = None
    """Knots of the mix after step 0 (objectives.mix is the mix at step 0), e.g. causal for the first 75% of the
    steps, then MLM: mix {causal: 1} with schedule {hold: [[75%, {mlm: 1}]]}. A plain knot list moves the shares
    linearly between knots. Syntax and semantics: launch/train/schedules.py. None: the mix is fixed."""
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-objective parameters, e.g. {mlm: {rate: 0.3}}; passed to objectives.build_objective. A float parameter
    may be a schedule, e.g. {mlm: {rate: [[0, 0.30], [100%, 0.15]]}} (launch/train/schedules.py)."""
    mode_tokens: bool = False
    """Prepend a UL2-style mode token per objective."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 16
    """Rows per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = micro_batch_size x grad_accum x world size."""
    batch_warmup: list[Any] | dict[str, Any] | None = None
    """Batch-size warm-up: micro-batches per step as a schedule up to grad_accum, e.g. [[0, 1], [10%, 8]] (a
    linear ramp, rounded down) or {hold: [[0, 2], [5%, 4]]} (launch/train/schedules.py). The micro-batch stays
    micro_batch_size, so memory and compiled shapes (train.compile) never change; DeepSpeed is built for grad_accum,
    so ZeRO's buffers and bucket sizes are those of the full batch from the first step. None: grad_accum always."""
    lr_follows: LrFollows = "steps"
    """'steps', or 'tokens': under batch_warmup or seq_len_phases the LR schedule (warm-up, decay) runs on the
    share of the run's tokens seen rather than the share of steps. warmup_steps then counts steps' worth of tokens:
    the LR is at its peak once warmup_steps / max_steps of the run's tokens are seen."""
    max_steps: int = 200
    """Optimizer steps of the whole run (the LR schedule spans these)."""
    stop_at: int = 0
    """If > 0: checkpoint and exit once this step is reached, without changing the schedule (time-sliced jobs;
    a later launch with the same out_dir resumes)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    schedule: Schedule = "warmup_linear"
    """LR schedule: 'warmup_linear' (linear decay after warm-up), 'warmup_cosine' (cosine decay), or 'wsd'
    (warm-up, stable at lr, then linear decay over the last decay_frac of the steps)."""
    min_lr_ratio: float = 0.1
    """Every schedule decays to lr x min_lr_ratio at max_steps."""
    decay_frac: float = 0.2
    """'wsd' only: fraction of max_steps spent decaying at the end."""
    warmup_steps: int = 20
    """Linear warm-up from lr/warmup_steps (not 0: step 1 must move the weights) to lr."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay; never applied to norms or biases."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 1234
    """Seeds the weights, the shard order, the objective mix and every mask."""
    precision: Precision = "auto"
    """'fp32', 'bf16', or 'auto' (bf16 on GPUs, fp32 on CPU)."""
    zero_stage: ZeroStage | None = None
    """ZeRO stage 0-3; None keeps the stage in the DeepSpeed config file."""
    deepspeed_config: str = "deepspeed_config.json"
    """The engine config; its batch and optimizer values may be 'auto' (filled from this config)."""
    peak_tflops: float = 0.0
    """Per-GPU peak (bf16 dense TFLOP/s) for MFU; 0 guesses from the device name (H100/H200: 989). MFU is not
    reported on CPU."""
    attention_backend: AttentionBackend = "sdpa"
    """Attention kernel: 'sdpa' (PyTorch's scaled_dot_product_attention, given a dense [B, T, T] mask whenever rows
    are packed or the pattern is prefix), 'flex' (FlexAttention block masks: blocks holding no same-document pair
    are skipped) or 'auto' (flex on a GPU when a mask is needed, sdpa otherwise). A runtime choice: checkpoints
    and exports are the same whichever kernel trained them."""
    compile: bool = False
    """torch.compile each encoder layer (fullgraph, static shapes) before training, and with head_loss='fused'
    its per-chunk softmax work; the first steps pay for the compilation."""
    activation_checkpointing: ActivationCheckpointing = "none"
    """'none', 'full' (recompute every encoder block in the backward pass instead of keeping its activations) or
    'every_n' (only blocks i with i % activation_checkpointing_every == 0). Same loss and gradients; the
    checkpointed blocks run their forward twice per step. `--dry-run` shows the activation memory it saves."""
    activation_checkpointing_every: int = 2
    """n of 'every_n' (1 is the same as 'full'); ignored otherwise."""
    head_loss: HeadLoss = "plain"
    """The decoder's cross entropy: 'plain' (the [N, vocab] logits, then F.cross_entropy on their fp32 copy, all
    kept for backward) or 'fused' (chunked, with the input, weight and bias gradients computed in the forward:
    the logits are never stored; model/head_loss.py). Same loss and gradients; 'fused' keeps 4 bytes per
    labelled position x vocab less for backward and moves about a third less memory. Ignored under ZeRO-3 (with
    a warning), which gathers the decoder's weight only around the decoder module's own forward."""
    max_bad_steps: int = 5
    """Steps in a row with a non-finite loss (each skipped) before the run halts with an error."""
    log_every: int = 10
    """Steps between progress lines and TensorBoard points."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (oldest deleted after `latest` moves on)."""

    def recompute_every(self) -> int:
        """activation_checkpointing as the encoder's setting: 0 (none), 1 (full) or n (every_n)."""
        mode = self.activation_checkpointing
        return 0 if mode == "none" else 1 if mode == "full" else self.activation_checkpointing_every


MANIFEST_KEYS = ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
"""The fields of model.EncoderConfig the data manifest's tokenizer sets; a config may not set them."""


@dataclass
class ModelConfig:
    """The encoder's shape: the fields of model.EncoderConfig but MANIFEST_KEYS, plus init_from.

    A shape field left unset (null) takes EncoderConfig's default or, with init_from, the folder's value: a field
    set here is one the user chose, and must agree with init_from's folder."""

    hidden_size: int | None = None
    """Width of the residual stream."""
    num_layers: int | None = None
    """Number of transformer blocks."""
    num_heads: int | None = None
    """Attention heads per block; hidden_size / num_heads is the head width and must be even (RoPE)."""
    intermediate_size: int | None = None
    """GeGLU inner width (the MLP's input projection outputs twice this)."""
    max_position_embeddings: int | None = None
    """Longest row the model accepts; data.seq_len may not exceed it."""
    global_attn_every_n_layers: int | None = None
    """Layer i attends globally when i % n == 0 and through a sliding window otherwise (1: every layer global;
    ModernBERT uses 3)."""
    local_attention: int | None = None
    """Total sliding-window size of the local layers: a query sees the keys within local_attention // 2 of it.
    Even and >= 2 when some layer is local."""
    global_rope_theta: float | None = None
    """RoPE base of the global layers (older configs called it rope_theta)."""
    local_rope_theta: float | None = None
    """RoPE base of the local layers."""
    norm_eps: float | None = None
    """Epsilon of every LayerNorm."""
    init_std: float | None = None
    """Base standard deviation of the truncated-normal weight init."""
    init_from: str = ""
    """A Hugging Face ModernBERT folder (ModernBertModel or ModernBertForMaskedLM: a cloze export, or one written
    by transformers' save_pretrained) to continue pretraining from. Its config.json gives the model's shape (a
    shape field set here must agree with it); its safetensors weights are loaded on every rank before DeepSpeed
    starts, the MLM head too when the folder has one (else the head gets cloze's normal init); its vocab size and
    special ids must be the data's tokenizer's. Pickle weights are refused. When out_dir already holds a
    checkpoint, the run resumes from it and the folder's weights are not loaded. Empty: train from cloze's random
    init."""

    def encoder_kwargs(self) -> dict[str, Any]:
        """The shape fields set in the config, as keyword arguments of model.EncoderConfig."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "init_from" and getattr(self, f.name) is not None}


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    """Run directory: checkpoints/, tensorboard/, train.log."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """As written in YAML, with the model keys that are set only (so a run's run.json and config_hash change
        only when its config does)."""
        out = dataclasses.asdict(self)
        out["model"] = self.model.encoder_kwargs()
        if self.model.init_from:
            out["model"]["init_from"] = self.model.init_from
        return out


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "objectives": ObjectivesConfig, "train": TrainConfig,
             "eval": EvalConfig}


def _suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key[:100], valid, n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(sorted(valid))})"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The field types of a config dataclass, resolved (this module postpones its annotations)."""
    return get_type_hints(cls)


def _choices(hint: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` (or `Literal[...] | None`) field allows; () for any other type."""
    if get_origin(hint) in (Union, types.UnionType):
        return tuple(value for arg in get_args(hint) for value in _choices(arg))
    return get_args(hint) if get_origin(hint) is Literal else ()


def _check_type(path: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """Coerce a YAML value to the field's type; record a problem instead of raising."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):  # `X | None`: null leaves the field unset
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
        origin = get_origin(hint)
    if origin is Literal:  # here its type; whether it is one of the values, validate checks beside the ranges
        base = type(get_args(hint)[0])
        if not isinstance(value, base) or (isinstance(value, bool) and base is not bool):
            problems.append(f"{path}: must be {_one_of(get_args(hint))}, got {shown(value)}")
    elif hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {shown(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {shown(value)}")
    elif hint is float:
        return _to_float(path, value, problems)
    elif hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {shown(value)}")
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {shown(value)}")
    elif origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(get_args(hint)):
            problems.append(f"{path}: expected a list of {len(get_args(hint))} numbers, got {shown(value)}")
            return value
        return tuple(value)
    return value


def _to_float(path: str, value: Any, problems: list[str]) -> Any:
    if isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-4` as a string; every user writes it, so accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{path}: expected a number, got {shown(value)}")
        return value
    return float(value)


def _build_section(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    obj = cls()
    if raw is None:
        return obj
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: expected a mapping, got {shown(raw)}")
        return obj
    hints = _hints(cls)
    for key, value in raw.items():
        if key not in hints:
            problems.append(_unknown_key(cls, prefix, key))
            continue
        setattr(obj, key, _check_type(f"{prefix}.{key}", value, hints[key], problems))
    return obj


def _unknown_key(cls: type, prefix: str, key: Any) -> str:
    """The problem line for a key the section does not have, with the nearest valid key (or all of them)."""
    names = list(_hints(cls))
    if cls is ModelConfig:
        from model.config import LEGACY_ROPE_THETA

        if key in MANIFEST_KEYS:
            return f"model.{key}: set by the data manifest, remove it from the config"
        if key == LEGACY_ROPE_THETA:
            return (f"model.{key}: renamed to model.global_rope_theta (the global layers' RoPE base; "
                    "model.local_rope_theta sets the local layers')")
    if not isinstance(key, str):
        return f"{prefix}: key {shown(key)} must be a field name{_suggest('', names)}"
    return f"{prefix}.{key}: unknown key{_suggest(key, names)}"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _colon_key_problems(node: Any, prefix: str) -> list[str]:
    """YAML reads `{mlm:0.8}` (no space after the colon) as the key 'mlm:0.8' with no value; name each one."""
    if not isinstance(node, dict):
        return []
    out = []
    for key, value in node.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        name, _, rest = key.partition(":") if isinstance(key, str) else ("", "", "")
        if value is None and name and _is_number(rest):  # a URL key without a weight is not this mistake
            out.append(f"{prefix or 'top level'}: YAML read {shown(key)} as one key with no value; put a space after "
                       f"the colon ({name}: {rest}), e.g. objectives.mix='{{mlm: 0.8, span: 0.2}}'")
        else:
            out += _colon_key_problems(value, where)
    return out


def _line_break_problems(node: Any, prefix: str) -> list[str]:
    """Every key or string value of the raw config holding a line break or NUL, named by its dotted key."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{prefix}.{shown(key) if not isinstance(key, str) else key}" if prefix else str(key)
            if isinstance(key, str) and (problem := one_line_problem(f"{prefix or 'top level'}: key", key)):
                out.append(problem)
                continue
            out += _line_break_problems(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _line_break_problems(value, f"{prefix}[{i}]")
    elif isinstance(node, str) and (problem := one_line_problem(prefix or "config", node)):
        out.append(problem)
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`train.max_steps=50 objectives.mix.causal=0.2` -> [(path, yaml-typed value)]."""
    out, bad = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            bad.append(f"override {shown(item)}: expected key=value, e.g. train.max_steps=50")
            continue
        # Checked on the text as typed: YAML folds a line break in a plain value into a space, but the override is
        # also written verbatim into a job script by launch.submit.
        if problem := one_line_problem(f"override {shown(key.strip())}", item):
            bad.append(problem)
            continue
        if key.count(".") >= MAX_DEPTH:
            bad.append(f"override {shown(key.strip())}: more than {MAX_DEPTH} dotted parts; keys are like "
                       f"train.max_steps")
            continue
        try:
            out.append((key.strip(), parse_yaml(text)))
        except yaml.YAMLError as e:
            bad.append(f"override {shown(key.strip())}: {_yaml_problem(e)}")
    if bad:
        raise ConfigError(bad, "overrides")
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply overrides, build the typed config and run the checks that need nothing else."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p} (pass an existing YAML, e.g. launch/configs/demo.yaml)"])
        if p.stat().st_size > MAX_EXPANDED:  # read nothing larger than a config could be
            raise ConfigError([f"{p.stat().st_size:,} bytes; a config is a few KB (at most {MAX_EXPANDED:,} bytes)"],
                              source)
        try:
            raw = parse_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([_yaml_problem(e)], source) from None
        except UnicodeDecodeError as e:
            raise ConfigError([f"not UTF-8 text ({e.reason} at byte {e.start})"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], source)
    for key, value in parse_overrides(list(overrides)):
        _set_path(raw, key, value)
    if broken := _line_break_problems(raw, ""):
        raise ConfigError(broken, source)
    if colon_keys := _colon_key_problems(raw, ""):
        # Checked before the sections: the unknown-key and mix errors these cause would hide the real mistake.
        raise ConfigError(colon_keys, source)

    problems: list[str] = []
    cfg = RunConfig()
    valid_top = list(_hints(RunConfig))
    for key, value in raw.items():
        if key == "init_from":
            problems.append("init_from: write it under the model section (model.init_from)")
        elif key not in valid_top:
            problems.append(f"{key}: unknown section{_suggest(str(key), valid_top)}")
        elif key in _SECTIONS:
            setattr(cfg, key, _build_section(_SECTIONS[key], value, key, problems))
        else:
            setattr(cfg, key, _check_type(key, value, _hints(RunConfig)[key], problems))
    if not problems:
        problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def validate(cfg: RunConfig) -> list[str]:
    """Every check that needs only the config and the code (not the data or the world size)."""
    from launch.train.phases import check_phases
    from launch.train.schedules import check_data_schedule, check_schedules  # mixes, schedules, parameters

    if unusable := _unusable_paths(cfg):
        return unusable  # the checks below would fail on these paths with an OSError naming no key
    return [*_choice_problems(cfg), *_path_problems(cfg), *_train_count_problems(cfg.train),
            *_train_optimizer_problems(cfg.train), *_data_problems(cfg.data), *_eval_problems(cfg.eval),
            *_model_problems(cfg), *check_schedules(cfg), *check_data_schedule(cfg),
            *check_phases(cfg)]


def _one_of(values: tuple[Any, ...]) -> str:
    """'a, b or c'."""
    text = [str(v) for v in values]
    return f"{', '.join(text[:-1])} or {text[-1]}" if len(text) > 1 else text[0]


def _choice_problems(cfg: RunConfig) -> list[str]:
    """Every field typed `Literal[...]` must hold one of its values (the Literal lists them)."""
    out = []
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        for name, hint in _hints(type(obj)).items():
            value, allowed = getattr(obj, name), _choices(hint)
            if allowed and value is not None and value not in allowed:  # None got past the type check: optional
                out.append(f"{section}.{name}: must be {_one_of(allowed)}, got {shown(value)}")
    return out


def _path_problems(cfg: RunConfig) -> list[str]:
    """The files and folders the config names that must exist (or, for out_dir, be creatable) before launch."""
    out = _check_writable("out_dir", Path(cfg.out_dir))
    if not Path(cfg.train.deepspeed_config).is_file():
        out.append(f"train.deepspeed_config: file not found: {cfg.train.deepspeed_config}")
    remote_eval = cfg.eval.path.startswith(("http://", "https://", "pipe:"))
    if cfg.eval.path and not remote_eval and not Path(cfg.eval.path).exists():
        out.append(f"eval.path: not found: {cfg.eval.path} (prepare held-out shards with launch.prepare, or set "
                   f"eval.path='' to disable evaluation)")
    if not Path(cfg.data.path).exists():
        out.append(f"data.path: not found: {cfg.data.path} (write it with: python -m launch.prepare --input ... "
                   f"--out {cfg.data.path})")
    if cfg.model.init_from and not Path(cfg.model.init_from).is_dir():
        out.append(f"model.init_from: folder not found: {cfg.model.init_from} (a Hugging Face ModernBERT folder: "
                   "config.json and safetensors weights, e.g. one written by launch.export)")
    return out


def _train_count_problems(t: TrainConfig) -> list[str]:
    """Step and batch counts."""
    out = []
    for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints", "max_bad_steps",
                 "activation_checkpointing_every"):
        if getattr(t, name) < 1:
            out.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    for name in ("warmup_steps", "checkpoint_every", "stop_at"):
        if getattr(t, name) < 0:
            out.append(f"train.{name}: must be >= 0, got {getattr(t, name)}")
    if t.warmup_steps >= t.max_steps >= 1:
        out.append(f"train.warmup_steps={t.warmup_steps} must be < train.max_steps={t.max_steps}")
    return out


def _train_optimizer_problems(t: TrainConfig) -> list[str]:
    """The learning rate, its schedule and AdamW's settings."""
    out = []
    if not t.lr > 0:
        out.append(f"train.lr: must be > 0, got {t.lr}")
    if not 0 < t.decay_frac <= 1:
        out.append(f"train.decay_frac: must lie in (0, 1], got {t.decay_frac}")
    if not 0 <= t.min_lr_ratio <= 1:
        out.append(f"train.min_lr_ratio: must lie in [0, 1], got {t.min_lr_ratio}")
    if t.weight_decay < 0:
        out.append(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    if t.grad_clip < 0:
        out.append(f"train.grad_clip: must be >= 0 (0 disables), got {t.grad_clip}")
    if not all(0 <= b < 1 for b in t.betas):
        out.append(f"train.betas: each must lie in [0, 1), got {list(t.betas)}")
    return out


def _data_problems(d: DataConfig) -> list[str]:
    out = []
    if d.seq_len < 8:
        out.append(f"data.seq_len: must be >= 8, got {d.seq_len}")
    if d.num_workers < 0:
        out.append(f"data.num_workers: must be >= 0, got {d.num_workers}")
    if not d.cache_max_gb > 0:
        out.append(f"data.cache_max_gb: must be > 0 GiB, got {shown(d.cache_max_gb)}")
    if d.shuffle_window_shards < 1:
        out.append(f"data.shuffle_window_shards: must be >= 1, got {d.shuffle_window_shards}")
    for key in ("read_stall_s", "read_timeout_s"):
        if not getattr(d, key) > 0:
            out.append(f"data.{key}: must be > 0 seconds, got {shown(getattr(d, key))}")
    for src, w in d.sources.items():
        if not isinstance(src, str):
            out.append(f"data.sources: key {shown(src)} must be a prepared directory, an http(s):// URL or pipe:")
        elif isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            out.append(f"data.sources.{src}: weight must be a positive number, got {shown(w)}")
        elif "://" not in src and not src.startswith("pipe:") and not Path(src).exists():
            out.append(f"data.sources.{src}: not found (a prepared directory, an http(s):// URL or pipe:)")
    return out


def _eval_problems(e: EvalConfig) -> list[str]:
    if e.every < 1 or e.batches < 1:
        return [f"eval.every and eval.batches: must be >= 1, got {e.every} and {e.batches}"]
    return []


def _model_problems(cfg: RunConfig) -> list[str]:
    """The shape must make an EncoderConfig and hold data.seq_len; with init_from the folder's shape is checked by
    preflight instead (it needs the folder and the data's tokenizer)."""
    from model.config import EncoderConfig

    if cfg.model.init_from:
        return []
    out = []
    try:
        EncoderConfig(vocab_size=1024, **cfg.model.encoder_kwargs())
    except ValueError as e:
        out.append(f"model: {e}")
    max_pos = cfg.model.max_position_embeddings
    if max_pos is None:
        max_pos = EncoderConfig.__dataclass_fields__["max_position_embeddings"].default
    if cfg.data.seq_len > max_pos:
        out.append(f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings={max_pos}")
    return out



def _unusable_paths(cfg: RunConfig) -> list[str]:
    """Paths of the config the system cannot even look up (a name longer than the file system allows, a folder
    that may not be searched): one problem each, naming the key."""
    paths = {"out_dir": cfg.out_dir, "data.path": cfg.data.path, "eval.path": cfg.eval.path,
             "train.deepspeed_config": cfg.train.deepspeed_config, "model.init_from": cfg.model.init_from}
    paths.update({f"data.sources.{src}": src for src in cfg.data.sources
                  if isinstance(src, str) and "://" not in src and not src.startswith("pipe:")})
    out = []
    for key, path in paths.items():
        try:
            os.stat(path or ".")
        except (FileNotFoundError, NotADirectoryError):
            pass  # reported, with the fix, by the checks of validate
        except OSError as e:
            out.append(f"{key}: cannot look up {shown(path)} ({e.strerror}); give a path this system can open")
    return out


def warn(message: str) -> None:
    """A config option that is ignored: say so once (rank 0 or a launcher), never silently."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {_clip(message)}", file=sys.stderr, flush=True)


def _check_writable(key: str, path: Path) -> list[str]:
    """The run directory must be creatable and writable: finding out at the first checkpoint wastes the run."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"{key}: cannot create {path}: {probe} is not a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"{key}: {probe} is not writable (needed for {path}); choose another {key}"]
    return []


def config_hash(cfg: RunConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
