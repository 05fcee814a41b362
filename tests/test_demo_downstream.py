"""launch/downstream.py's task and verdict, without fine-tuning: the labelled set is built from real standard-library
source, evaluation modules never appear in training, and the verdict calls a win only beyond the spread over
seeds. The fine-tuning itself runs in tests/test_demo_main.py (the main job, tiny) and tests/test_finetune.py."""

from __future__ import annotations

import csv
import sysconfig
from pathlib import Path

import pytest

from launch.downstream import (
    KEYWORDS,
    MASK,
    TaskConfig,
    blanked_statements,
    build_task,
    split_modules,
    summarise,
    verdict,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("task")
    return out, build_task(STDLIB, out, TaskConfig(train_rows=20, eval_rows=30))


def test_rows_are_balanced_blanked_real_code(task):
    out, counts = task
    train, held = read_rows(out / "train.csv"), read_rows(out / "eval.csv")
    assert counts["train"]["rows"] == len(train) == 20 * len(KEYWORDS)
    assert counts["eval"]["rows"] == len(held) == 30 * len(KEYWORDS)
    assert [r["label"] for r in train].count("raise") == 20 and {r["label"] for r in held} == set(KEYWORDS)
    for row in train + held:
        lines = row["text"].split("\n")
        assert len(lines) == 3 and lines[-1].lstrip().startswith(MASK) and row["text"].count(MASK) == 1, row
        # the blank really held that keyword: the module's source has the line with the keyword put back
        line = lines[-1].replace(MASK, row["label"], 1)
        assert line in (STDLIB / row["module"]).read_text(encoding="utf-8"), row


def test_split_is_by_module(task):
    out, counts = task
    train, held = read_rows(out / "train.csv"), read_rows(out / "eval.csv")
    shared = {r["module"] for r in train} & {r["module"] for r in held}
    assert not shared, f"modules in both splits: {sorted(shared)[:5]}"
    assert counts["train"]["modules"] > 20 and counts["eval"]["modules"] > 20
    # the same corpus gives the same task
    again = build_task(STDLIB, out / "again", TaskConfig(train_rows=20, eval_rows=30))
    assert again == counts and (out / "again" / "eval.csv").read_text() == (out / "eval.csv").read_text()


def test_split_modules_holds_out_about_the_share():
    modules = {f"pkg/m{i}.py": ["row"] * (i + 1) for i in range(20)}
    train, held = split_modules(modules, share=0.3)
    assert set(train) | set(held) == set(modules) and not set(train) & set(held)
    held_rows = sum(len(modules[m]) for m in held)
    assert 0.3 * 210 <= held_rows <= 0.3 * 210 + 20
    assert all(split_modules({"a.py": ["x"] * 50, "b.py": ["y"]})), "two modules: one each side"


def test_blanked_statements_come_from_the_syntax_tree(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text('import os\n\n\ndef f(x):\n    """return the path; if it is None, raise."""\n'
                   "    if x is None:\n        raise ValueError(x)\n    elif x:\n        pass\n"
                   "    for part in x:\n        print(part)  # return later\n    return os.fspath(x)\n")
    assert blanked_statements(src) == [  # ast.walk order: outer statements first; `elif` and strings skipped
        ('def f(x):\n    """return the path; if it is None, raise."""\n    [MASK] x is None:', "if"),
        ("elif x:\n    pass\n[MASK] part in x:", "for"),
        ("for part in x:\n    print(part)  # return later\n[MASK] os.fspath(x)", "return"),
        ('"""return the path; if it is None, raise."""\nif x is None:\n    [MASK] ValueError(x)', "raise")]
    (tmp_path / "bad.py").write_bytes(b"def f(:\n\xff")
    assert blanked_statements(tmp_path / "bad.py") == []


def test_too_little_code_is_a_clear_error(tmp_path):
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "only.py").write_text("x = 1\ny = 2\nif x:\n    y = 3\n")
    with pytest.raises(ValueError, match=r"1 module\(s\) of solo hold return/if/for/raise statements"):
        build_task(tmp_path, tmp_path / "out", TaskConfig(), packages=("solo",))
    (tmp_path / "solo" / "other.py").write_text("x = 1\ny = 2\nif x:\n    y = 3\n")
    with pytest.raises(ValueError, match=r"only 0 'return' statements in the train modules, 32 wanted"):
        build_task(tmp_path, tmp_path / "out", TaskConfig(), packages=("solo",))


def test_verdict_needs_a_margin_beyond_the_spread():
    pre, rand = summarise([0.80, 0.82, 0.84]), summarise([0.70, 0.71, 0.72])
    assert pre["mean"] == pytest.approx(0.82) and pre["spread"] == pytest.approx(0.04)
    won, says = verdict(pre, rand)
    assert won and "wins by +11.0 points" in says
    won, says = verdict(summarise([0.74, 0.80, 0.86]), rand)
    assert not won and "did NOT win" in says and "spread over seeds 12.0 points" in says
    won, _ = verdict(summarise([0.70, 0.70]), summarise([0.72, 0.72]))
    assert not won
