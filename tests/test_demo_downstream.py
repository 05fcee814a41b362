"""launch/downstream.py's task and verdict, without fine-tuning: the labelled set is built from real standard-library
source, evaluation modules never appear in training, and the verdict calls a win only beyond the spread over
seeds. The fine-tuning itself runs in tests/test_demo_main.py (the main job, tiny) and tests/test_finetune.py."""

from __future__ import annotations

import csv
import sysconfig
from pathlib import Path

import pytest

from launch.downstream import PACKAGES, TaskConfig, build_task, function_texts, split_modules, summarise, verdict

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("task")
    return out, build_task(STDLIB, out, TaskConfig(train_rows=40, eval_rows=30))


def test_rows_are_balanced_real_functions(task):
    out, counts = task
    train, held = read_rows(out / "train.csv"), read_rows(out / "eval.csv")
    assert [r["label"] for r in train].count("email") == 40 and len(train) == 40 * len(PACKAGES)
    assert len(held) == 30 * len(PACKAGES)
    assert {r["label"] for r in train} == {r["label"] for r in held} == set(PACKAGES)
    for row in train + held:
        assert row["text"].startswith(("def ", "async def ")), row["text"][:40]
        assert row["module"].startswith(row["label"] + "/"), row
        assert (STDLIB / row["module"]).is_file()
    assert counts["xml"]["eval"]["rows"] == 30


def test_split_is_by_module(task):
    out, counts = task
    train, held = read_rows(out / "train.csv"), read_rows(out / "eval.csv")
    shared = {r["module"] for r in train} & {r["module"] for r in held}
    assert not shared, f"modules in both splits: {sorted(shared)[:5]}"
    for package in PACKAGES:
        assert counts[package]["train"]["modules"] >= 2 and counts[package]["eval"]["modules"] >= 2
    # the same corpus gives the same task
    again = build_task(STDLIB, out / "again", TaskConfig(train_rows=40, eval_rows=30))
    assert again == counts and (out / "again" / "eval.csv").read_text() == (out / "eval.csv").read_text()


def test_split_modules_holds_out_about_the_share():
    modules = {f"pkg/m{i}.py": ["def f(): pass"] * (i + 1) for i in range(20)}
    train, held = split_modules(modules, share=0.3)
    assert set(train) | set(held) == set(modules) and not set(train) & set(held)
    held_rows = sum(len(modules[m]) for m in held)
    assert 0.3 * 210 <= held_rows <= 0.3 * 210 + 20
    two = {"a.py": ["x"] * 50, "b.py": ["y"]}
    assert all(split_modules(two)), "two modules: one each side"


def test_function_texts(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("import os\n\n\ndef short():\n    pass\n\n\nclass C:\n    async def method(self, value):\n"
                   "        '''A docstring long enough to keep.'''\n        return await os.fspath(value) + 'x' * 40\n")
    texts = function_texts(src)
    assert texts == ["async def method(self, value):\n    '''A docstring long enough to keep.'''\n"
                     "    return await os.fspath(value) + 'x' * 40"]
    (tmp_path / "bad.py").write_bytes(b"def f(:\n\xff")
    assert function_texts(tmp_path / "bad.py") == []


def test_a_package_with_one_module_is_a_clear_error(tmp_path):
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "only.py").write_text("def f(a, b):\n    '''Add two numbers and return the sum.'''\n"
                                               "    return a + b + 0 + 0 + 0 + 0 + 0\n")
    with pytest.raises(ValueError, match=r"solo: 1 module\(s\) with functions"):
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
