"""What bench/gpu_speed.py measures: the issue's shapes (cloze's encoder and the transformers peer it is compared with,
with the issue's targets) and the run's configuration, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIX = {"mlm": 0.8, "span": 0.1, "causal": 0.1}


@dataclass(frozen=True)
class Shape:
    """One comparison: a cloze encoder and the transformers peer it is measured against."""

    name: str
    """Row label, e.g. 'bert-512'."""
    peer: str
    """'bert' (BertForMaskedLM) or 'modernbert' (ModernBertForMaskedLM)."""
    seq_len: int
    """Tokens per row, for both."""
    layers: int
    """Encoder blocks, for both."""
    hidden: int
    """Residual width, for both."""
    heads: int
    """Attention heads, for both."""
    intermediate: int
    """cloze's GeGLU inner width."""
    peer_intermediate: int
    """The peer's MLP width: BERT's dense 3072 has the parameters of a GeGLU 2048 (2 h 3072 = 3 h 2048)."""
    target_ratio: float
    """cloze tokens/s over the peer's that the issue asks for."""
    target_tokens_per_s: float = 0.0
    """Absolute cloze target (0: none)."""

    def __post_init__(self) -> None:
        if self.peer not in ("bert", "modernbert"):
            raise ValueError(f"Shape {self.name}: peer={self.peer!r} must be 'bert' or 'modernbert'")
        for key in ("seq_len", "layers", "hidden", "heads", "intermediate", "peer_intermediate"):
            if getattr(self, key) < 1:
                raise ValueError(f"Shape {self.name}: {key}={getattr(self, key)} must be >= 1")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"Shape {self.name}: hidden {self.hidden} / heads {self.heads} must be an even width")


FULL_SHAPES = {s.name: s for s in (
    Shape("bert-512", "bert", 512, 12, 768, 12, 2048, 3072, 1.85, 650e3),
    Shape("modernbert-512", "modernbert", 512, 22, 768, 12, 1152, 1152, 2.5),
    Shape("modernbert-1024", "modernbert", 1024, 22, 768, 12, 1152, 1152, 2.5),
)}
TINY_SHAPES = {s.name: s for s in (
    Shape("tiny-bert-64", "bert", 64, 2, 64, 4, 128, 192, 1.85, 650e3),
    Shape("tiny-modernbert-64", "modernbert", 64, 3, 64, 4, 96, 96, 2.5),
    Shape("tiny-modernbert-128", "modernbert", 128, 3, 64, 4, 96, 96, 2.5),
)}


@dataclass
class SpeedConfig:
    """What one run measures; built from the command line."""

    out: Path | None
    """JSON results file (written after every row); None only with --prepare-only or --accounting."""
    shapes: list[Shape]
    """The comparisons to run."""
    data: Path
    """Prepared directory (manifest.json + shards + tokenizer); prepared here first if it has no manifest."""
    device: str
    """'cuda' or 'cpu'; every row runs on it."""
    tiny: bool
    """Tiny shapes and corpus: the whole harness in seconds on a CPU."""
    tokens_per_step: int
    """Tokens per optimizer step for every row (micro batch = tokens_per_step / seq_len, no accumulation)."""
    steps: int
    """Timed optimizer steps per row (rounded up to whole log windows)."""
    warmup: int
    """Untimed steps first, at least; raised to whole log windows and until every objective has run."""
    log_every: int
    """cloze's log window in steps (its tokens/s granularity)."""
    workers: int
    """cloze loader worker processes."""
    peak_tflops: float
    """bf16 (fp32 on CPU) matmul peak for MFU; 0 measures it."""
    systems: list[str]
    """'cloze' and/or 'peer'."""
    budget_s: float
    """Rows that would start after this many seconds are skipped (keeps a 10-minute device call whole)."""
    work: Path
    """Scratch for the cloze runs (checkpoints are deleted after each row)."""
    cloze_overrides: list[str] = field(default_factory=list)
    """Extra `key=value` overrides for launch.train, for every cloze variant."""
    variants: dict[str, list[str]] = field(default_factory=lambda: {"cloze": []})
    """cloze rows per shape: row label -> its own launch.train overrides (a lever under test). Labels start with
    'cloze'."""
    seed: int = 26
    """Weights, data order, objective mix; 26 runs all three objectives within 4 steps (no seed does it sooner), which
    keeps the tiny warm-up short."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose cpu or cuda")
        for key in ("tokens_per_step", "steps", "log_every", "budget_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(self, key)} must be positive")
        if self.warmup < 0 or self.workers < 0 or self.peak_tflops < 0:
            raise ValueError("--warmup, --workers and --peak-tflops must be >= 0")
        bad = [s.name for s in self.shapes if self.tokens_per_step % s.seq_len]
        if bad:
            raise ValueError(f"--tokens-per-step {self.tokens_per_step} is not a multiple of the sequence length of "
                             f"{bad}; pick a multiple of every seq_len")
        bad = [o for o in self.cloze_overrides + [o for v in self.variants.values() for o in v] if "=" not in o]
        if bad:
            raise ValueError(f"--cloze-override {bad[0]!r}: expected key=value, e.g. train.lr=1e-4")
        if not self.variants or not all(name.startswith("cloze") for name in self.variants):
            raise ValueError(f"--cloze-variant: names must start with 'cloze', got {sorted(self.variants)}")
        if not set(self.systems) <= {"cloze", "peer"} or not self.systems:
            raise ValueError(f"--systems {','.join(self.systems)}: give cloze, peer or cloze,peer")

    @property
    def precision(self) -> str:
        return "bf16" if self.device == "cuda" else "fp32"
