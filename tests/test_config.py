"""Config loading and validation: one error listing every problem, raised before anything starts."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
from importlib.metadata import packages_distributions
from typing import get_args

import pytest

from launch.config import (
    MANIFEST_KEYS,
    AttentionBackend,
    ConfigError,
    HeadLoss,
    ModelConfig,
    OnBadData,
    load_config,
)
from launch.train.engine_config import resolve_deepspeed_config
from tests.conftest import ROOT


def test_shipped_configs_load(tmp_path):
    paths = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = load_config(path, [f"data.path={tmp_path}"])  # the data is checked separately (preflight)
        assert cfg.train.max_steps >= 1, path


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", ["train.max_steps=7", "objectives.mix.causal=0.5",
                                                          "train.lr=1e-4", f"data.path={tmp_path}"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.objectives.mix["causal"] == 0.5


def test_unknown_keys_get_a_suggestion_and_all_problems_are_listed():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "launch/configs/tiny.yaml", ["train.max_step=5", "train.lr=-1", "data.seq_lenn=3"])
    msg = str(e.value)
    assert "train.max_step: unknown key (did you mean 'max_steps'?)" in msg
    assert "data.seq_lenn: unknown key (did you mean 'seq_len'?)" in msg
    assert len(e.value.problems) == 2  # range checks run only once the keys are right


@pytest.mark.parametrize("mix, needle", [
    ({"mlmm": 1.0}, "mlmm"),
    ({"mlm": -0.5, "causal": 1.0}, "negative"),
    ({"mlm": 0.0, "causal": 0.0}, "zero"),
])
def test_bad_objective_mix_is_rejected(tmp_path, mix, needle):
    f = tmp_path / "c.yaml"
    f.write_text(json.dumps({"objectives": {"mix": mix}}))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value).lower()


def test_unknown_objective_name_suggests_the_nearest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("objectives:\n  mix: {mlmm: 1.0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "mlm" in str(e.value).replace("mlmm", "")


def test_bad_yaml_and_missing_file_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("does/not/exist.yaml")
    assert "\n" not in str(e.value) and "not found" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "\n" not in str(e.value) and "not valid YAML" in str(e.value) and str(bad) in str(e.value)


def test_deepspeed_batch_mismatch_lists_every_number(tmp_path):
    ds = json.loads((ROOT / "deepspeed_config.json").read_text())
    ds["train_batch_size"] = 64
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", [f"train.deepspeed_config={f}", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        resolve_deepspeed_config(cfg, world_size=2, precision="fp32")
    msg = str(e.value)
    assert "train_batch_size=64" in msg and "8 x grad_accum 1 x world size 2 = 16" in msg


def test_deepspeed_auto_values_are_filled_from_the_training_config(tmp_path):
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", ["train.grad_accum=3", f"data.path={tmp_path}"])
    ds = resolve_deepspeed_config(cfg, world_size=4, precision="bf16")
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == cfg.train.grad_clip


def test_every_choice_problem_is_listed_in_one_error_with_the_valid_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "launch/configs/tiny.yaml", [
            f"data.path={tmp_path}", "train.schedule=linear", "train.precision=fp16", "train.zero_stage=4",
            "train.attention_backend=flash", "train.head_loss=chunked", "train.activation_checkpointing=some",
            "data.on_bad_data=ignore", "train.lr=-1"])
    assert sorted(e.value.problems) == sorted([
        "train.schedule: must be warmup_linear, warmup_cosine or wsd, got 'linear'",
        "train.precision: must be auto, fp32 or bf16, got 'fp16'",
        "train.zero_stage: must be 0, 1, 2 or 3, got 4",
        "train.attention_backend: must be auto, sdpa or flex, got 'flash'",
        "train.head_loss: must be plain or fused, got 'chunked'",
        "train.activation_checkpointing: must be none, full or every_n, got 'some'",
        "data.on_bad_data: must be fail or skip, got 'ignore'",
        "train.lr: must be > 0, got -1.0",  # the range checks run beside the choices
    ])


@pytest.mark.parametrize("override, problem", [
    ("train.zero_stage=true", "train.zero_stage: must be 0, 1, 2 or 3, got True"),
    ("train.schedule=5", "train.schedule: must be warmup_linear, warmup_cosine or wsd, got 5"),
    ("train.lr=null", "train.lr: expected a number, got None"),
])
def test_a_choice_or_number_of_the_wrong_type_is_named(tmp_path, override, problem):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "launch/configs/tiny.yaml", [f"data.path={tmp_path}", override])
    assert e.value.problems == [problem]


def test_the_config_choices_are_the_ones_the_code_accepts():
    from data.reader import ON_BAD_DATA
    from model.attention import ATTENTION_BACKENDS
    from model.head_loss import HEAD_LOSSES

    assert get_args(AttentionBackend) == ATTENTION_BACKENDS
    assert get_args(HeadLoss) == HEAD_LOSSES
    assert get_args(OnBadData) == ON_BAD_DATA


def test_the_model_section_is_the_encoder_config_less_the_manifest_keys():
    from model.config import EncoderConfig

    encoder = {f.name: f.type for f in dataclasses.fields(EncoderConfig) if f.name not in MANIFEST_KEYS}
    section = {f.name: f.type for f in dataclasses.fields(ModelConfig) if f.name != "init_from"}
    assert section == {name: f"{kind} | None" for name, kind in encoder.items()}
    assert set(MANIFEST_KEYS) < {f.name for f in dataclasses.fields(EncoderConfig)}


def test_model_keys_are_typed_and_only_the_set_ones_reach_the_encoder(tmp_path):
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", [f"data.path={tmp_path}", "model.num_layers=6",
                                                          "model.global_rope_theta=1e5"])
    assert cfg.model.num_layers == 6 and cfg.model.global_rope_theta == 1e5 and cfg.model.norm_eps is None
    assert cfg.model.encoder_kwargs() == {"hidden_size": 64, "num_layers": 6, "num_heads": 4, "intermediate_size": 96,
                                          "max_position_embeddings": 256, "global_rope_theta": 1e5}
    assert cfg.to_dict()["model"] == cfg.model.encoder_kwargs()  # init_from only when set
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", [f"data.path={tmp_path}", f"model.init_from={tmp_path}"])
    assert cfg.model.init_from == str(tmp_path) and cfg.to_dict()["model"]["init_from"] == str(tmp_path)


def test_model_key_problems_are_listed_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "launch/configs/tiny.yaml", [f"data.path={tmp_path}", "model.hiden_size=32",
                                                        "model.vocab_size=500", "model.rope_theta=1e4",
                                                        "model.num_layers=2.5"])
    assert sorted(e.value.problems) == [
        "model.hiden_size: unknown key (did you mean 'hidden_size'?)",
        "model.num_layers: expected an integer, got 2.5",
        "model.rope_theta: renamed to model.global_rope_theta (the global layers' RoPE base; model.local_rope_theta "
        "sets the local layers')",
        "model.vocab_size: set by the data manifest, remove it from the config",
    ]


def _imported_modules(folders: list[str]) -> set[str]:
    """The top-level names of every absolute import in the .py files under `folders`."""
    names: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def _third_party(modules: set[str]) -> dict[str, set[str]]:
    """module -> the installed distributions providing it, for every module neither stdlib nor cloze's own."""
    provided = packages_distributions()
    own = {"launch", "model", "data", "objectives", "bench", "tests"}
    return {m: {_normalise(d) for d in provided.get(m, [m])} for m in modules
            if m not in sys.stdlib_module_names and m not in own}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>~!\[; ]", name)[0]).lower()


def _project() -> dict:
    """pyproject.toml's [project] table."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_declares_every_import_and_keeps_test_tools_apart():
    project = _project()
    runtime = {_normalise(d) for d in project["dependencies"]}
    test = {_normalise(d) for d in project["optional-dependencies"]["test"]}
    product = _third_party(_imported_modules(["launch", "model", "data", "objectives", "bench"]))
    assert {m: d for m, d in product.items() if not d & runtime} == {}  # an import no runtime dependency provides
    # and no runtime dependency nothing imports (protobuf: data/tokenizer.py reads sentencepiece's protobuf models)
    assert runtime - {d for ds in product.values() for d in ds} == {"protobuf"}
    tests = _third_party(_imported_modules(["tests"]))
    assert {m: d for m, d in tests.items() if not d & (runtime | test)} == {}
    # used from the command line (scripts/test.sh), not imported
    unused_test_tools = test - {d for ds in tests.values() for d in ds} - {"pytest-timeout", "pytest-xdist", "ruff"}
    assert unused_test_tools == set() and not test & runtime


def _pin(spec: str) -> tuple[str, str]:
    name, _, version = spec.partition("==")
    return _normalise(name), version.strip()


def test_requirement_files_pin_what_pyproject_declares():
    project = _project()

    def pins(name: str) -> set[tuple[str, str]]:
        return {_pin(line) for line in (ROOT / name).read_text().splitlines() if "==" in line}

    assert pins("requirements.txt") == {_pin(d) for d in project["dependencies"]}
    assert pins("requirements-test.txt") == {_pin(d) for d in project["optional-dependencies"]["test"]}
