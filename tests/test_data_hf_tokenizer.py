"""data/hf_tokenizer.py: the Hugging Face files encode exactly like data.tokenizer.Tokenizer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.hf_tokenizer import HF_FILES, write_hf_tokenizer
from data.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.data_helpers import synthetic_corpus, trained_model

transformers = pytest.importorskip("transformers")

SAMPLES = [
    "",
    "x",
    "café naïve Ünïcödé façade",
    "日本語のテキストと中文",
    "emoji 😀🎉 and flags 🇫🇷 and zwj 👩‍💻",
    "def f(a, b):\n    if a:\n\n        return b\n\n\n    return None\n",
    "a     b          c" + " " * 37 + "d",
    "\tindented\twith\ttabs\t\t\n\t\t\tmore",
    "  leading and trailing spaces  ",
    "windows\r\nline\r\nendings\r\n",
    "x" * 5000,
    "supercalifragilistic" * 200,
    "alpha" * 300,  # the 1024-character cut falls inside a vocabulary word
    "=" * 77 + "\n" + "#" * 33 + "\n" + "-" * 1500,
    "".join(synthetic_corpus(40, seed=9)),  # spans many 1024-character segments
    "literal <0x41> and ▁ marker",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_tokenizer(trained_model(), tmp_path_factory.mktemp("hf"), model_max_length=256)


@pytest.fixture(scope="module")
def sp() -> Tokenizer:
    return Tokenizer(trained_model())


@pytest.fixture(scope="module")
def hf(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def hf_split(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir), split_special_tokens=True)


def test_files_and_special_tokens(hf_dir, hf):
    for name in HF_FILES:
        assert (hf_dir / name).is_file()
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert hf.convert_ids_to_tokens(list(range(9))) == list(SPECIAL_TOKENS)
    assert sorted(hf.all_special_ids) == list(range(9))
    assert hf.model_max_length == 256
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_parity_on_samples(sp, hf, hf_split, text):
    ids = sp.encode(text)
    assert hf(text)["input_ids"] == [2, *ids, 3]
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_split(text)["input_ids"] == [2, *ids, 3]
    assert hf.decode(ids) == sp.decode(ids)


def test_pair_and_padding(sp, hf):
    enc = hf(["ab", "abc def"], padding=True)
    a, b = sp.encode("ab"), sp.encode("abc def")
    width = max(len(a), len(b)) + 2
    assert enc["input_ids"][0] == [2, *a, 3] + [0] * (width - len(a) - 2)
    pair = hf("ab", "cd")["input_ids"]
    assert pair == [2, *a, 3, *sp.encode("cd"), 3]


def test_literal_special_strings(sp, hf, hf_split):
    text = "fill [MASK] here"
    # HF convention (the fill-mask pipeline needs it): the literal token string is the mask token
    assert 4 in hf(text, add_special_tokens=False)["input_ids"]
    # with split_special_tokens the HF tokenizer reads it as SentencePiece does: plain text
    assert hf_split(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


# random Unicode, and code-like strings dense in the hard cases (space runs, literal special/byte strings)
CODE_BITS = st.sampled_from(list(" \n\t_=()[]<>x0aé日😀") + ["    ", "[MASK]", "<0x41>"])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
       | st.lists(CODE_BITS, max_size=400).map("".join))
def test_parity_on_any_text(hf_split, text):
    sp = Tokenizer(trained_model())
    assert hf_split(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_rejects_foreign_model(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="x.model"):
        write_hf_tokenizer(bad, tmp_path / "out", 128)
    with pytest.raises(ValueError, match="model_max_length"):
        write_hf_tokenizer(trained_model(), tmp_path / "out", 0)
