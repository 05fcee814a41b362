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
                  "Your support site shows a {w} on every device I try.", "I restarted twice but the {w} is still there."],
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
