"""launch/export/modelcard.py on run folders written by the same writers the trainer uses (torch's SummaryWriter,
metrics.jsonl lines, summary.json, a real manifest), without training: resumed runs, the jsonl fallback, a card
for an earlier checkpoint, and the PNG the card references."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from launch.config import RunConfig
from launch.export.modelcard import PNG_NAME, read_scalars, write_model_card
from model.config import EncoderConfig


def write_events(tb: Path, points: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb))
    for tag, series in points.items():
        for step, value in series:
            writer.add_scalar(tag, value, step)
    writer.close()


def run_info(data: Path, step: int, eval_path: str = "") -> dict:
    cfg = RunConfig()
    cfg.data.path, cfg.eval.path, cfg.train.zero_stage = str(data), eval_path, 2
    cfg.objectives.mix = {"mlm": 0.7, "span": 0.2, "causal": 0.1}
    cfg.objectives.params = {"mlm": {"rate": 0.3}}
    enc = EncoderConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)
    return {"config": cfg.to_dict(), "encoder": enc.to_dict(), "world_size": 2, "zero_stage": 2, "step": step,
            "tokens_seen": step * 4096, "manifest": str(data)}


@pytest.fixture
def resumed_run(tmp_path) -> Path:
    """A run logged to step 30, restarted from its step-20 checkpoint and continued to step 40: TensorBoard holds
    two event files and steps 22-30 twice."""
    run = tmp_path / "run"
    first = {"loss/mlm": [(s, 7.0 - 0.05 * s) for s in range(2, 31, 2)],
             "loss/span": [(s, 7.5 - 0.05 * s) for s in range(5, 31, 5)],
             "accuracy/mlm": [(s, 0.01 * s) for s in range(2, 31, 2)],
             "eval/mlm_loss": [(10, 6.5), (20, 6.0), (30, 5.5)]}
    write_events(run / "tensorboard", first)
    time.sleep(0.05)  # the second file must be newer, as after a real restart
    second = {"loss/mlm": [(s, 9.0) for s in range(22, 41, 2)],
              "loss/span": [(s, 9.5) for s in range(25, 41, 5)],
              "accuracy/mlm": [(s, 0.5) for s in range(22, 41, 2)],
              "eval/mlm_loss": [(30, 4.0), (40, 3.0)]}
    write_events(run / "tensorboard", second)
    return run


def test_resumed_run_keeps_the_latest_value_per_step(resumed_run):
    scalars = read_scalars(resumed_run)
    steps = [s for s, _, _ in scalars["loss/mlm"]]
    assert steps == list(range(2, 41, 2)), "one point per step, in order"
    values = dict((s, v) for s, v, _ in scalars["loss/mlm"])
    assert values[20] == pytest.approx(6.0) and values[22] == values[30] == values[40] == 9.0
    assert [(s, v) for s, v, _ in scalars["eval/mlm_loss"]] == [(10, 6.5), (20, 6.0), (30, 4.0), (40, 3.0)]
    assert all(w > 0 for _, _, w in scalars["loss/mlm"]), "TensorBoard points carry their wall time"


def test_max_step_documents_an_earlier_checkpoint(resumed_run):
    scalars = read_scalars(resumed_run, max_step=20)
    assert max(s for s, _, _ in scalars["loss/mlm"]) == 20
    assert [(s, v) for s, v, _ in scalars["eval/mlm_loss"]] == [(10, 6.5), (20, 6.0)]


def test_metrics_jsonl_when_there_is_no_tensorboard(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss": {"mlm": 7.0}, "lr": 0.1}, {"step": 2, "loss": {"causal": 6.5}, "lr": 0.2},
             {"step": 2, "eval/mlm_loss": 6.0, "eval/mlm_accuracy": 0.1}, {"step": 3, "loss": {"mlm": 6.0}, "lr": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    scalars = read_scalars(run)
    assert [(s, v) for s, v, _ in scalars["loss/mlm"]] == [(1, 7.0), (3, 6.0)]
    assert [(s, v) for s, v, _ in scalars["loss/causal"]] == [(2, 6.5)]
    assert [(s, v) for s, v, _ in scalars["eval/mlm_loss"]] == [(2, 6.0)]


def card_for(run: Path, info: dict, summary: dict | None, with_head: bool = False) -> tuple[str, Path]:
    ckpt = run / "checkpoints"
    tag = f"step_{info['step']:08d}"
    (ckpt / tag).mkdir(parents=True)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    out = run.parent / f"export-{info['step']}-{with_head}"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")  # listed under Files; the card does not read weights
    readme = write_model_card(out, ckpt, tag, info, with_head=with_head, dtype="bf16", precision="bf16")
    return readme.read_text(), out


def test_card_numbers_and_png(resumed_run, tiny_data):
    info = run_info(tiny_data, step=40, eval_path=str(tiny_data))
    summary = {"steps": 40, "tokens_seen": 40 * 4096, "wall_s": 754.0}
    card, out = card_for(resumed_run, info, summary)
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    for fact in ("40 optimizer steps", f"{40 * 4096:,} tokens", f"{manifest['totals']['tokens']:,}",
                 f"{manifest['totals']['documents']:,}", "| mlm | 70% | {\"rate\": 0.3} |", "| span | 20% | defaults |",
                 "12 min 34 s", "| precision | bf16 |", "| DeepSpeed ZeRO stage | 2 |", "2 data-parallel ranks",
                 "| mlm | 9.0000 | 0.5000 | 3.0000 | n/a |", "| span | 9.5000 | n/a | n/a | n/a |",
                 "`ModernBertModel` in bf16",
                 "## Intended use", "## Limitations", "AutoModel.from_pretrained", "SentenceTransformer",
                 "`model.safetensors`"):
        assert fact in card, f"card lacks {fact!r}"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert images == [PNG_NAME]
    from matplotlib.image import imread

    pixels = imread(out / PNG_NAME)
    assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 900, pixels.shape  # two panels
    assert pixels[..., :3].std() > 0.05, "the plot is blank"


def test_card_for_an_earlier_checkpoint(resumed_run, tiny_data):
    # summary.json describes step 40; the step-20 card must use the curves up to 20 and no wall time from it
    info = run_info(tiny_data, step=20, eval_path=str(tiny_data))
    card, _ = card_for(resumed_run, info, {"steps": 40, "tokens_seen": 1, "wall_s": 754.0}, with_head=True)
    assert "20 optimizer steps" in card and "12 min 34 s" not in card
    assert "| mlm | 6.0000 | 0.2000 | 6.0000 | n/a |" in card and "9.0000" not in card
    assert "pipeline(\"fill-mask\"" in card and "ModernBertForMaskedLM" in card


def test_card_without_eval_or_manifest(tmp_path):
    run = tmp_path / "run"
    write_events(run / "tensorboard", {"loss/mlm": [(1, 7.0), (2, 6.8)]})
    info = run_info(tmp_path / "moved-away", step=2)
    card, out = card_for(run, info, None)
    assert "no evaluation set" in card
    assert "moved-away" in card and "no longer there" in card
    assert (out / PNG_NAME).is_file()



def test_card_reads_a_hostile_manifest_as_not_valid(tmp_path, tiny_data):
    """The manifest named by the run is not trusted: a replaced one (a name that is not a plain path, markdown in
    extra fields, a size beyond any manifest) never reaches the card; the card says it is no longer valid."""
    raw = json.loads((tiny_data / "manifest.json").read_text())
    raw["tokenizer"]["path"] = "../x;touch MARK"
    raw["sources"] = ["[click](http://evil)"]
    for i, text in enumerate((json.dumps(raw), "{" + " " * (65 * 1024 * 1024) + "}")):
        run, data = tmp_path / f"run{i}", tmp_path / f"data{i}"
        write_events(run / "tensorboard", {"loss/mlm": [(1, 7.0), (2, 6.8), (3, 6.7)]})
        data.mkdir()
        (data / "manifest.json").write_text(text)
        card, _ = card_for(run, run_info(data, step=2 + i), None)  # card_for exports beside run, named by step
        assert "no longer valid" in card and "evil" not in card and "touch" not in card

def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n"), "the card starts with YAML front matter"
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_card_metadata(resumed_run, tiny_data):
    info = run_info(tiny_data, step=40, eval_path=str(tiny_data))
    card, _ = card_for(resumed_run, info, None)
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "feature-extraction"
    assert meta["language"] == ["en"] and {"cloze", "modernbert", "encoder"} <= set(meta["tags"])
    assert meta["cloze"] == {"architecture": "ModernBertModel", "parameters": meta["cloze"]["parameters"],
                             "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 96,
                             "vocab_size": 1000, "max_position_embeddings": info["encoder"]["max_position_embeddings"],
                             "steps": 40, "tokens_seen": 40 * 4096}
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {"type": "loss", "name": "held-out mlm_loss", "value": 3.0} in metrics
    head = front_matter(card_for(resumed_run, run_info(tiny_data, step=20), None, with_head=True)[0])
    assert head["pipeline_tag"] == "fill-mask" and head["cloze"]["architecture"] == "ModernBertForMaskedLM"


def test_add_downstream_section_and_metadata(resumed_run, tiny_data):
    from launch.export.modelcard import add_downstream

    _, out = card_for(resumed_run, run_info(tiny_data, step=40, eval_path=str(tiny_data)), None)
    report = {"name": "blanked keyword", "task": "which keyword was blanked out", "train_rows": 40, "eval_rows": 60,
              "chance": 0.25, "epochs": 4, "lr": 1e-3, "max_length": 128, "seeds": [0, 1],
              "pretrained": {"mean": 0.8125, "std": 0.0125, "values": [0.8, 0.825]},
              "random_init": {"mean": 0.6, "std": 0.01, "values": [0.59, 0.61]},
              "verdict": "the pretrained encoder wins by +21.2 points"}
    add_downstream(out, report)
    report["pretrained"] = {"mean": 0.7, "std": 0.0, "values": [0.7, 0.7]}
    card = add_downstream(out, report).read_text()  # a second run replaces the section and the entry
    assert card.count("## Downstream evaluation") == 1 and "0.812" not in card
    section = card[card.index("## Downstream evaluation"):card.index("## Intended use")]
    assert "| this encoder | 0.700 ± 0.000 | 0.700, 0.700 |" in section
    assert "| random, same shape | 0.600 ± 0.010 | 0.590, 0.610 |" in section
    assert "Verdict: the pretrained encoder wins by +21.2 points." in section and "seeds (0, 1)" in section
    results = front_matter(card)["model-index"][0]["results"]
    assert [r["task"]["type"] for r in results] == ["fill-mask", "text-classification"]
    assert results[1]["metrics"][0]["value"] == 0.7 and results[1]["task"]["name"] == "blanked keyword"
    assert card.index("## Results") < card.index("## Downstream evaluation") < card.index("## Limitations")


def mode_rows(card: str) -> dict[str, tuple[str, int]]:
    """objective -> (token, id) from the card's mode-token table."""
    rows = re.findall(r"^\| (\w+) \| `(\[MODE_\w+\])` \| (\d+) \|", card, flags=re.M)
    return {name: (token, int(i)) for name, token, i in rows}


def test_card_documents_mode_tokens_with_the_export_tokenizer_ids(tmp_path, tiny_data):
    """A run with mode tokens: the card names each mode's token and id, which are the ids of the tokenizer files an
    export ships and of the tokenizer training used; the snippet prepends the chosen id."""
    from transformers import AutoTokenizer

    from data.hf_tokenizer import write_hf_tokenizer
    from data.tokenizer import Tokenizer

    run = tmp_path / "run"
    write_events(run / "tensorboard", {"loss/prefix": [(1, 7.0), (2, 6.8)], "eval/prefix_loss": [(2, 6.5)],
                                       "eval/prefix_accuracy": [(2, 0.05)], "eval/prefix_perplexity": [(2, 665.1)],
                                       "eval/causal_perplexity": [(2, 700.2)]})
    info = run_info(tiny_data, step=2, eval_path=str(tiny_data))
    info["config"]["objectives"].update(mix={"causal": 0.3, "prefix": 0.5, "span": 0.2}, mode_tokens=True)
    ckpt = run / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    out = tmp_path / "export"
    write_hf_tokenizer(tiny_data / "tokenizer" / "spm.model", out, model_max_length=512)
    card = write_model_card(out, ckpt, "step_00000002", info, with_head=False, dtype="fp32").read_text()

    modes = mode_rows(card)
    assert set(modes) == {"mlm", "span", "causal", "prefix"}, card
    hf = AutoTokenizer.from_pretrained(out)
    training = Tokenizer(tiny_data / "tokenizer" / "spm.model").mode_ids
    for name, (token, i) in modes.items():
        assert hf.convert_tokens_to_ids(token) == i == training[name], (name, token, i)
        assert i in hf.all_special_ids, "a mode token must be special: never split, never masked"
    shipped = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert {token: i for token, i in modes.values()} == {t: shipped[t] for t, _ in modes.values()}
    assert "| prefix | `[MODE_PREFIX]` | 8 | prefix attention (bidirectional prefix, causal after it) | 50% |" in card
    assert "| mlm | `[MODE_MLM]` | 5 | bidirectional attention | 0% (never seen in training) |" in card
    # the snippet selects span, the bidirectional mode this mix trained (mlm was not in it)
    assert 'tok.convert_tokens_to_ids("[MODE_SPAN]")' in card and "Here the span mode, `[MODE_SPAN]` = 6" in card
    assert "| prefix | 6.8000 | n/a | 6.5000 | 0.0500 |" in card
    assert "Held-out perplexity: causal 700.2, prefix 665.1." in card
    assert "pretrained with causal, prefix and span language modelling only" in card
    assert front_matter(card)["model-index"][0]["results"][0]["task"]["name"] == "prefix language modelling"


def test_card_without_mode_tokens_warns_against_them(resumed_run, tiny_data):
    card, _ = card_for(resumed_run, run_info(tiny_data, step=40), None)
    assert "## Mode tokens" not in card and not mode_rows(card)
    assert "Mode tokens: off" in card and "[MODE_PREFIX] (8)" in card and "never saw them" in card
