"""Downstream proof: on a small support e-mail task, a cloze-pretrained encoder fine-tunes to a clearly better
accuracy than the same architecture from random weights.

The task (generated, seeded): sort e-mails into billing, technical and feedback. Each class has 12 topic words.
The unlabelled pretraining corpus uses all of them inside class-typical sentences. The labelled rows put one topic
word into a neutral frame shared by every class ("Hello, a question about the refund. Regards."), and the
evaluation rows use only topic words that no training row contains. A random-init classifier has never seen those
words in a useful context, so it can only guess; masked-language pretraining has learnt that "refund" and
"invoice" fill the same slots, so the pretrained classifier transfers from one to the other.

Pipeline, as a user runs it: launch.prepare -> launch.train (2 ranks, DeepSpeed) -> launch.export ->
launch.finetune twice (pretrained, --random-init).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed

TOPICS = {
    "billing": ["invoice", "refund", "charge", "payment", "receipt", "subscription",
                "bill", "price", "discount", "fee", "credit", "tax"],
    "technical": ["crash", "error", "bug", "login", "password", "freeze",
                  "install", "update", "server", "timeout", "sync", "screen"],
    "feedback": ["compliment", "suggestion", "idea", "design", "praise", "wish",
                 "opinion", "review", "survey", "experience", "story", "thanks"],
}
HELD_OUT = 6
"""The last 6 topic words of each class appear only in the evaluation rows (and in the unlabelled corpus)."""

CONTEXTS = {
    "billing": ["I was charged twice this month for the {w}.", "My bank statement shows a wrong {w}.",
                "Please send the money back, the {w} is too high.", "Where can I download the {w} for my accountant?",
                "The {w} on my card does not match the plan I bought.", "I paid, but the {w} still says unpaid."],
    "technical": ["The app stopped working after the {w}.", "I get a blank page and a {w} when I open it.",
                  "Since yesterday the {w} makes my laptop unusable.", "Nothing happens when I click, maybe a {w}?",
                  "Your support site shows a {w} on every device I try.",
                  "I restarted twice but the {w} is still there."],
    "feedback": ["Your team did a fantastic job, here is my {w}.", "I just wanted to share a {w} about the new look.",
                 "Keep up the good work, one small {w} from me.", "We love the product and wrote a {w} for you.",
                 "A happy customer here with a {w} for the designers.", "Thank you all, my {w} is only positive."],
}
OPENINGS = ["Hello,", "Hi team,", "Dear support,", "Good morning,"]
CLOSINGS = ["Regards, Ann", "Best, Tom", "Thanks, Li", "Cheers, Sam"]
FRAMES = ["Hello, a question about the {w}. Regards.", "Hi, this is about the {w}.", "Dear team, re: {w}. Thanks.",
          "Subject: {w}", "I am writing about the {w}, see below."]
"""Neutral frames for the labelled rows: every class uses all of them, so only the topic word tells the class."""


def email(rng: random.Random, label: str) -> str:
    words = rng.sample(TOPICS[label], 3)
    body = " ".join(rng.choice(CONTEXTS[label]).format(w=w) for w in words)
    return f"{rng.choice(OPENINGS)} {body} {rng.choice(CLOSINGS)}"


def write_corpus(path: Path, docs: int, seed: int) -> None:
    rng = random.Random(seed)
    path.mkdir(parents=True)
    for shard in range(4):
        with open(path / f"mail-{shard}.jsonl", "w") as f:
            for _ in range(docs // 4):
                f.write(json.dumps({"text": email(rng, rng.choice(list(TOPICS)))}) + "\n")


def write_rows(path: Path, held_out: bool) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for label, words in TOPICS.items():
            for w in (words[-HELD_OUT:] if held_out else words[:-HELD_OUT]):
                for frame in FRAMES:
                    out.writerow([frame.format(w=w), label])


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """Corpus -> prepared shards -> a 2-rank MLM pretraining run -> an export; plus the labelled CSVs."""
    root = tmp_path_factory.mktemp("finetune")
    write_corpus(root / "corpus", docs=4000, seed=0)
    # 480 pieces: about the most this narrow corpus yields, enough for most topic words to be one piece
    run_cli(["launch.prepare", "--input", str(root / "corpus" / "*.jsonl"), "--out", str(root / "data"),
             "--vocab-size", "480", "--shard-bytes", "400000"], check=True)
    run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"out_dir={root / 'run'}",
             f"data.path={root / 'data'}", "objectives.mix={mlm: 1.0}", "train.max_steps=700", "train.log_every=50",
             "train.warmup_steps=10"], check=True)
    run_cli(["launch.export", "--checkpoint", str(root / "run"), "--out", str(root / "export"), "--no-card"],
            check=True)
    write_rows(root / "train.csv", held_out=False)
    write_rows(root / "eval.csv", held_out=True)
    return {"export": root / "export", "train": root / "train.csv", "eval": root / "eval.csv", "root": root}


def finetune_cli(task: dict[str, Path], name: str, *extra: str) -> dict:
    report = task["root"] / f"{name}.json"
    proc = run_cli(["launch.finetune", "--export", str(task["export"]), "--train", str(task["train"]),
                    "--eval", str(task["eval"]), "--epochs", "8", "--lr", "1e-3", "--report", str(report), *extra],
                   check=True)
    assert proc.stdout.startswith("accuracy "), proc.stdout
    return json.loads(report.read_text())


def test_pretrained_encoder_beats_random_init(task):
    pretrained = finetune_cli(task, "pretrained")
    random_init = finetune_cli(task, "random", "--random-init")
    print(f"\nsupport e-mail task, 90 eval rows with unseen topic words (chance 0.33): pretrained encoder "
          f"{pretrained['accuracy']:.3f}, random init of the same shape {random_init['accuracy']:.3f}")
    # the pretrained classifier starts from the export's encoder: only the classification layers are new
    assert pretrained["newly_initialised"] and all(k.startswith(("classifier.", "head."))
                                                   for k in pretrained["newly_initialised"])
    assert pretrained["correct"] == round(pretrained["accuracy"] * pretrained["rows"]) and pretrained["rows"] == 90
    # Both fit the training rows; only pretraining generalises to the unseen topic words. With 400 pretraining steps
    # and file-order reading, fine-tuning seeds 0-3 gave pretrained 0.76-0.84, random init 0.27-0.41; once the loader
    # shuffled documents inside shards, 400 steps gave 0.51 for one data order, so the run now takes 700 steps
    # (measured: pretrained 0.92, random init 0.31). With 90 rows an accuracy's standard error is about 0.05, so the
    # 0.55 floor and the 0.15 gap leave several standard errors of margin. The transfer appears only after a few
    # hundred steps: at 150 steps it is at chance.
    assert pretrained["train_accuracy"] >= 0.9 and random_init["train_accuracy"] >= 0.9
    assert pretrained["accuracy"] >= 0.55, pretrained["accuracy"]
    assert pretrained["accuracy"] - random_init["accuracy"] >= 0.15, (pretrained["accuracy"], random_init["accuracy"])


def test_bad_csv_is_a_clear_error(task, tmp_path, capsys):
    from launch.cli import run_cli as handle_errors
    from launch.finetune import main

    bad = tmp_path / "bad.csv"
    bad.write_text("message,category\nhello,billing\n")
    code = handle_errors(lambda: main(["--export", str(task["export"]), "--train", str(bad),
                                       "--eval", str(task["eval"])]))
    err = capsys.readouterr().err
    assert code == 2 and "bad.csv" in err and "lacks ['label', 'text']" in err, err
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("text,label\nhello,billing\nhi,refunds\n")
    code = handle_errors(lambda: main(["--export", str(task["export"]), "--train", str(task["train"]),
                                       "--eval", str(unseen)]))
    err = capsys.readouterr().err
    assert code == 2 and "['refunds'] never occur" in err, err
