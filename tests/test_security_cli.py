"""Hostile or malformed input on cloze's command lines and configs: each attempt is one `error:` line and exit code
2, and the file a payload would create never exists.

- A line break or NUL in any value written into an sbatch script (paths, overrides, names, options) is refused
  before rendering: inside a comment or an #SBATCH line it would start a line of shell, after which sbatch also
  ignores every later directive. Scripts go to a stand-in `sbatch` that runs them as a compute node would, so an
  injected line would really run.
- `launch.export --overwrite` replaces only an earlier export, never the run it exports, a folder around or inside
  that run, or any other folder.
- A deeply nested YAML or an alias bomb ("billion laughs") is refused in bounded time and memory, with the value
  cut short in the message.
- `launch.finetune --export` of a missing folder or of a folder that is no export names it and the fix.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

INJECTED = "touch {marker}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def one_error(code: int, stderr: str) -> str:
    """The single `error:` line of a refused command (exit 2, no traceback, nothing else said)."""
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# -- line breaks in values of a generated sbatch script ----------------------------------------------------------

@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """`sbatch` and `srun` stand-ins on PATH. sbatch records its call and runs the script with bash, as the batch
    host of a job does (the script's srun lines reach the srun stand-in, which records its argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, srun_args = tmp_path / "sbatch-calls", tmp_path / "srun-args"
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
printf '%s\\n' "$@" >> {calls}
SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=n1 SLURM_NTASKS=1 timeout 60 bash "${{!#}}" > "${{!#}}.log" 2>&1
echo 4242
""")
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {srun_args}\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(ROOT)  # launch.submit's paths are relative to the repository, as in the other tests
    return {"calls": calls, "srun_args": srun_args, "marker": tmp_path / "MARK"}


def submit(argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m launch.submit ARGV` in this process, under the CLIs' error handler: (exit code, stdout, stderr)."""
    from launch.cli import run_cli as handle_errors
    from launch.submit import main

    capsys.readouterr()
    code = handle_errors(lambda: main(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def pretrain_args(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return ["--config", "launch/configs/tiny.yaml", f"data.path={data}", f"out_dir={tmp_path / 'run'}", *extra]


def test_stand_in_cluster_runs_the_script_and_one_line_hostile_values_stay_data(cluster, tmp_path, capsys):
    """The harness of the refusals below: a submitted script really runs (its --setup line creates OK), and a
    value full of shell syntax but on one line reaches the trainer's argv unchanged."""
    ok, marker = tmp_path / "OK", cluster["marker"]
    hostile_dir = tmp_path / f"run $(touch {marker}); `touch {marker}` '\""
    override = f"eval.path=$(touch {marker})"
    code, out, err = submit(pretrain_args(tmp_path, f"out_dir={hostile_dir}", "eval.path=''", "--setup",
                                          f"touch {ok}"), capsys)
    assert code == 0 and out.strip() == "4242", err
    assert ok.exists(), "the stand-in sbatch did not run the script"
    argv = cluster["srun_args"].read_text().split("\0")[:-1]
    assert argv[-2:] == [f"out_dir={hostile_dir}", "eval.path=''"], argv
    assert not marker.exists()
    # a hostile value that is not a valid path for the config is still refused as a config error, not run
    code, _, err = submit(pretrain_args(tmp_path, override), capsys)
    assert "eval.path" in one_error(code, err) and not marker.exists()


def _newline_config(tmp_path: Path, marker: Path) -> list[str]:
    config = tmp_path / "evil.yaml"
    config.write_text((ROOT / "launch/configs/tiny.yaml").read_text().replace(
        "out_dir: runs/tiny", f'out_dir: "{tmp_path}/run\\n{INJECTED.format(marker=marker)}"'))
    return ["--config", str(config), f"data.path={tmp_path}"]


def _config_named_with_a_newline(tmp_path: Path, marker: Path) -> list[str]:
    config = tmp_path / f"c\n{INJECTED.format(marker=marker)}\n#" / "tiny.yaml"  # the marker's '/' make folders
    config.parent.mkdir(parents=True)
    shutil.copy(ROOT / "launch/configs/tiny.yaml", config)
    return ["--config", str(config), f"data.path={tmp_path}", f"out_dir={tmp_path / 'run'}"]


CASES = {
    # name: (argv builder, words the error must hold)
    "config_value": (_newline_config, "out_dir:"),
    "config_file_name": (_config_named_with_a_newline, "--config:"),
    "override_raw": (lambda t, m: pretrain_args(t, f"out_dir={t}/r\n{INJECTED.format(marker=m)}\n#"),
                     "override 'out_dir'"),
    "override_yaml_escape": (lambda t, m: pretrain_args(t, f'eval.path="{t}\\n{INJECTED.format(marker=m)}"'),
                             "eval.path:"),
    "override_carriage_return": (lambda t, m: pretrain_args(t, f"train.seed=1\r{INJECTED.format(marker=m)}"),
                                 "override 'train.seed'"),
    "override_nul_escape": (lambda t, m: pretrain_args(t, f'out_dir="{t}/run\\0x"'), "out_dir:"),
    "job_name": (lambda t, m: pretrain_args(t, "--job-name", f"j\n{INJECTED.format(marker=m)}"), "--job-name:"),
    "partition": (lambda t, m: pretrain_args(t, "--partition", f"p\n{INJECTED.format(marker=m)}"), "--partition:"),
    "account": (lambda t, m: pretrain_args(t, "--account", f"a\r\n{INJECTED.format(marker=m)}"), "--account:"),
    "python": (lambda t, m: pretrain_args(t, "--python", f"{sys.executable}\n{INJECTED.format(marker=m)}"),
               "--python:"),
    "setup": (lambda t, m: pretrain_args(t, "--setup", f"true\n{INJECTED.format(marker=m)}"), "--setup:"),
    "sbatch_arg": (lambda t, m: pretrain_args(t, "--sbatch-arg", f"--qos=x\n{INJECTED.format(marker=m)}"),
                   "--sbatch-arg:"),
    "export_out": (lambda t, m: ["export", "--checkpoint", str(t), "--out", f"hf\n{INJECTED.format(marker=m)}\n#"],
                   "--out:"),
    "export_checkpoint": (lambda t, m: ["export", "--checkpoint", f"{t}\n{INJECTED.format(marker=m)}\n#", "--out",
                                        str(t / "hf")], "--checkpoint:"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_line_break_in_a_rendered_value_is_refused(case, cluster, tmp_path, capsys):
    build, words = CASES[case]
    code, out, err = submit(build(tmp_path, cluster["marker"]), capsys)
    assert not cluster["marker"].exists(), "the injected line ran"
    msg = one_error(code, err)
    assert words in msg and "line break or NUL" in msg, msg
    assert out == "" and not cluster["calls"].exists(), "a script was submitted"
    assert not (tmp_path / "run" / "slurm").exists(), "a script was written"


def test_dry_run_refuses_too_and_comments_quote_the_overrides(tmp_path):
    """The real CLI: --dry-run refuses a line break like a submission does; a one-line override with a '#' and
    quotes lands in the script's comment quoted, and the script parses as bash with every #SBATCH line first."""
    from tests.test_slurm_render import assert_valid_bash_with_directives_first

    marker = tmp_path / "MARK"
    proc = run_cli(["launch.submit", *pretrain_args(tmp_path, f"out_dir={tmp_path}/r\ntouch {marker}\n#"),
                    "--dry-run"], timeout=120)
    assert "override 'out_dir'" in one_error(proc.returncode, proc.stderr) and proc.stdout == ""
    proc = run_cli(["launch.submit", *pretrain_args(tmp_path, "train.seed=7 # it's"), "--dry-run"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tiny.yaml" in proc.stdout.splitlines()[1] and "'train.seed=7 # it'\"'\"'s'" in proc.stdout
    assert_valid_bash_with_directives_first(proc.stdout)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["config", "override", "out_dir", "checkpoint", "out"])
def test_renderers_refuse_line_breaks_themselves(field, tmp_path):
    """render_pretrain and render_export check their own inputs too, for callers other than launch.submit."""
    from launch.slurm.render import JobSpec, render_export, render_pretrain

    bad = "x\n#SBATCH --exclusive"
    with pytest.raises(ValueError, match="line break or NUL"):
        if field in ("checkpoint", "out"):
            render_export(bad if field == "checkpoint" else "run", bad if field == "out" else "hf", JobSpec(),
                          workdir=tmp_path)
        else:
            render_pretrain(bad if field == "config" else "c.yaml", [f"out_dir={bad}"] if field == "override" else [],
                            JobSpec(), bad if field == "out_dir" else tmp_path, 10, workdir=tmp_path)


# -- launch.export --overwrite -----------------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["run", "run/hf", "run/checkpoints/hf", "."])
def test_submit_export_into_the_run_is_refused_before_submitting(cluster, tmp_path, capsys, out):
    """The export job would fail only after the training job ends (--after): submit checks the paths first."""
    for checkpoint in ("run", "run/checkpoints", "run/checkpoints/step_00000002"):
        code, _, err = submit(["export", "--checkpoint", str(tmp_path / checkpoint), "--out", str(tmp_path / out),
                               "--after", "42"], capsys)
        assert "run directory" in one_error(code, err), err
    assert not cluster["calls"].exists(), "sbatch was called"
    code, _, err = submit(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "run-hf"),
                           "--after", "42"], capsys)
    assert code == 0, err


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """base/run: a 2-step 2-rank run; base/export: its export."""
    base = tmp_path_factory.mktemp("overwrite")
    run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"out_dir={base / 'run'}",
             f"data.path={tiny_data}", "train.max_steps=2", "train.warmup_steps=1"], check=True)
    run_cli(["launch.export", "--checkpoint", str(base / "run"), "--out", str(base / "export"), "--no-verify",
             "--no-card"], check=True)
    return base


def tree(root: Path) -> dict[str, int]:
    """Relative path -> size (-1 for a folder or link) of everything under root."""
    return {str(p.relative_to(root)): -1 if p.is_symlink() or p.is_dir() else p.stat().st_size
            for p in sorted(root.rglob("*"))}


def export_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`python -m launch.export ARGV` in this process, under the CLIs' error handler: (exit code, stderr)."""
    from launch.cli import run_cli as handle_errors
    from launch.export.main import main

    capsys.readouterr()
    code = handle_errors(lambda: main(argv))
    return code, capsys.readouterr().err


def _plant(base: Path, kind: str) -> Path:
    """The --out of each refused case (made under base when the case needs it)."""
    if kind == "symlink_to_run":
        (base / "link").symlink_to(base / "run", target_is_directory=True)
        return base / "link"
    if kind == "other_folder":
        (base / "mine").mkdir()
        (base / "mine" / "notes.txt").write_text("keep me")
        return base / "mine"
    if kind in ("forged_marker", "marker_without_config"):
        folder = base / kind
        folder.mkdir()
        (folder / "cloze_export.json").write_text('{"format": "something else"}' if kind == "forged_marker" else
                                                  '{"format": "cloze-export", "version": 1}')
        if kind == "forged_marker":
            (folder / "config.json").write_text("{}")
        return folder
    if kind == "file":
        (base / "a-file").write_text("keep me")
        return base / "a-file"
    return {"run_dir": base / "run", "parent_of_run": base, "inside_run": base / "run" / "checkpoints",
            "new_folder_inside_run": base / "run" / "hf"}[kind]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["run_dir", "parent_of_run", "inside_run", "new_folder_inside_run",
                                  "symlink_to_run", "other_folder", "forged_marker", "marker_without_config",
                                  "file"])
def test_export_out_that_would_lose_data_is_refused(trained, kind, tmp_path, capsys):
    base = Path(shutil.copytree(trained, tmp_path / "base", symlinks=True))
    out = _plant(base, kind)
    before = tree(base)
    code, err = export_cli(["--checkpoint", str(base / "run"), "--out", str(out), "--overwrite", "--no-verify",
                            "--no-card"], capsys)
    msg = one_error(code, err)
    assert tree(base) == before, "files changed"
    assert f"--out {out}" in msg, msg
    words = "run directory" if kind in ("run_dir", "parent_of_run", "inside_run", "new_folder_inside_run",
                                        "symlink_to_run") else "not a cloze export"
    assert words in msg, msg


@pytest.mark.distributed
def test_export_into_the_run_dir_refused_by_the_real_cli(trained, tmp_path):
    base = Path(shutil.copytree(trained, tmp_path / "base"))
    before = tree(base)
    proc = run_cli(["launch.export", "--checkpoint", str(base / "run"), "--out", str(base / "run"), "--overwrite"],
                   timeout=300)
    assert "is the run directory" in one_error(proc.returncode, proc.stderr)
    assert tree(base) == before


@pytest.mark.distributed
def test_overwrite_replaces_an_earlier_export(trained, tmp_path, capsys):
    from launch.export.main import EXPORT_MARKER

    base = Path(shutil.copytree(trained, tmp_path / "base"))
    out = base / "export"
    assert json.loads((out / EXPORT_MARKER).read_text())["format"] == "cloze-export"
    (out / "stale.txt").write_text("from the earlier export")
    code, err = export_cli(["--checkpoint", str(base / "run"), "--out", str(out), "--overwrite", "--no-verify",
                            "--no-card"], capsys)
    assert code == 0, err
    assert (out / "config.json").is_file() and (out / EXPORT_MARKER).is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in base.iterdir()) == ["export", "run"], "temporary folders left behind"


# -- hostile YAML ------------------------------------------------------------------------------------------------

def _laughs() -> list[str]:
    """The lines of a "billion laughs" document: the last one's value expands to 9**9 strings."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * 9)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    return [*lines, f"a8: [{', '.join(['*a7'] * 9)}]"]


def _train_dry_run(args: list[str], cap_memory: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m launch.train ... --dry-run`, by default with its address space capped at 1 GiB: a value expanded
    in memory then fails the test with a MemoryError instead of slowing the machine. (process, wall seconds)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launch.train", *args, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=cap if cap_memory else None)
    return proc, time.monotonic() - t0


HOSTILE_YAML = {
    # name: (text of the out_dir value, words the error must hold)
    "deep_sequence": ("[" * 20_000 + "]" * 20_000, "nested deeper than"),
    "deep_mapping": ("{a: " * 20_000 + "1" + "}" * 20_000, "nested deeper than"),
    "alias_bomb": ("{" + ", ".join(_laughs()) + "}", "once its aliases are expanded"),
    "recursive_alias": ("&r [*r]", "refers to its own anchor"),
    "long_list": ("[" + ", ".join(["x" * 50] * 2_000) + "]", "out_dir: expected a string"),
}


@pytest.mark.parametrize("where", ["file", "override"])
@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_hostile_yaml_is_one_short_line_quickly(case, where, tmp_path):
    value, words = HOSTILE_YAML[case]
    if where == "file":
        config = tmp_path / "hostile.yaml"
        config.write_text((ROOT / "launch/configs/tiny.yaml").read_text().replace("out_dir: runs/tiny",
                                                                                  f"out_dir: {value}"))
        args = ["--config", str(config)]
    else:
        args = ["--config", "launch/configs/tiny.yaml", f"out_dir={value}"]
    proc, seconds = _train_dry_run(args)
    msg = one_error(proc.returncode, proc.stderr)
    assert words in msg and len(msg) < 700, msg
    assert seconds < 10, f"took {seconds:.1f} s"  # in bounded time: ~1 s; without the bounds, 40 s or a crash


def test_billion_laughs_file_of_a_few_hundred_bytes(tmp_path):
    """The classic document as the whole config file, its last key a top-level setting."""
    text = "\n".join(_laughs()).replace("a8:", "out_dir:") + "\n"
    assert len(text) < 500
    config = tmp_path / "laughs.yaml"
    config.write_text(text)
    proc, seconds = _train_dry_run(["--config", str(config)])
    msg = one_error(proc.returncode, proc.stderr)
    assert "once its aliases are expanded" in msg and str(config) in msg and seconds < 10, msg


def test_deep_dotted_override_and_oversized_file(tmp_path):
    """Nesting made by a dotted override key, and a config file too large to be one, are refused the same way."""
    proc, seconds = _train_dry_run(["--config", "launch/configs/tiny.yaml", "train" + ".a" * 5_000 + "=1"])
    msg = one_error(proc.returncode, proc.stderr)
    assert "dotted parts" in msg and len(msg) < 700 and seconds < 10, msg
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 2_000_000 + "\nout_dir: runs/x\n")
    proc, seconds = _train_dry_run(["--config", str(big)])
    msg = one_error(proc.returncode, proc.stderr)
    assert str(big) in msg and "a config is a few KB" in msg and seconds < 10, msg


def test_long_values_are_cut_in_messages(tmp_path):
    """A value quoted by an error is cut to about 200 characters, whatever its size."""
    long = "y" * 50_000
    proc, _ = _train_dry_run(["--config", "launch/configs/tiny.yaml", f"train.schedule={long}",
                              f"data.path={tmp_path}"], cap_memory=False)  # the checks import torch
    msg = one_error(proc.returncode, proc.stderr)
    assert "train.schedule: must be" in msg and "..." in msg and len(msg) < 400, msg


def test_aliases_within_bounds_still_work(tmp_path, monkeypatch):
    """Anchors and aliases are fine in a config of ordinary size."""
    from launch.config import load_config

    monkeypatch.chdir(ROOT)  # the config's deepspeed_config is relative to the repository
    config = tmp_path / "anchors.yaml"
    config.write_text(f"out_dir: {tmp_path / 'run'}\ndata: {{path: &p {tmp_path}}}\neval: {{path: *p}}\n"
                      "train: {lr: &lr 2.0e-3, max_steps: 30, warmup_steps: 3}\n")
    cfg = load_config(config)
    assert cfg.eval.path == cfg.data.path == str(tmp_path) and cfg.train.lr == 2e-3


# -- launch.finetune --export that is no export -------------------------------------------------------------------

@pytest.fixture
def csvs(tmp_path) -> list[str]:
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\ngood day,pos\nbad day,neg\n")
    return ["--train", str(rows), "--eval", str(rows), "--epochs", "1"]


def test_finetune_missing_export_folder(csvs, tmp_path):
    missing = tmp_path / "no-such-export"
    proc = run_cli(["launch.finetune", "--export", str(missing), *csvs], timeout=120)
    msg = one_error(proc.returncode, proc.stderr)
    assert str(missing) in msg and "no such folder" in msg and "launch.export" in msg, msg


@pytest.mark.parametrize("kind", ["other_folder", "file", "config_only"])
def test_finetune_export_that_is_no_export(kind, csvs, tmp_path, capsys):
    from launch.cli import run_cli as handle_errors
    from launch.finetune import main

    export = tmp_path / "not-an-export"
    if kind == "file":
        export.write_text("hello")
    else:
        export.mkdir()
        (export / ("config.json" if kind == "config_only" else "notes.txt")).write_text(
            '{"model_type": "modernbert"}' if kind == "config_only" else "mine")
    capsys.readouterr()
    code = handle_errors(lambda: main(["--export", str(export), *csvs]))
    msg = one_error(code, capsys.readouterr().err)
    assert str(export) in msg and "launch.export" in msg, msg
    assert {"other_folder": "no config.json", "file": "not a folder", "config_only": "no tokenizer.json"}[kind] in msg
