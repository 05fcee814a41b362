"""cloze's MLM against code cloze did not write: transformers' DataCollatorForLanguageModeling(mlm_probability=0.15)
on the same rows, with the tokenizer files cloze ships (data/hf_tokenizer.py), so both sides read the same ids as
special.

Rows: 600 texts of real prepared shards, each framed [CLS] ... [SEP] as the HF tokenizer frames a text, of
300-510 pieces, right-padded with [PAD] per batch of 50 by the collator itself: about 240k eligible tokens, 36k
selected. Each measured rate is checked against its nominal value and the two implementations against each other,
within Z = 4 standard errors of a binomial proportion, SE = sqrt(p (1 - p) / n) (for the difference of the two,
sqrt(SE_hf^2 + SE_cloze^2)). At these counts 4 SE is about 0.3 points on the selection rate and 0.8 points on the
80% [MASK] share. A false alarm at 4 SE has probability about 6e-5 per comparison.

- Selection: HF draws each eligible token independently (binomial: a row of 400 tokens varies by about 7
  selections), cloze meets each row's budget of rate x eligible to within one token (objectives/common.py:
  select_units); the binomial SE is therefore an upper bound for cloze's spread, and the test uses it for both.
- 80/10/10: both decide per selected token. Expected shares are exact, not just nominal: a random replacement
  that happens to draw the original token looks "kept". HF draws its replacements from the whole vocabulary
  (len(tokenizer) = V ids), so one in V also lands on [MASK] and 8 in V on another special token ([PAD], [CLS],
  a mode token, ...); cloze draws only ordinary ids (n_ord of them) and never a special one. These are tenths of
  a per cent, below the tolerance, but they are the one place where the two differ, and the test measures it.
- Special tokens and padding: neither ever selects one (HF reads the tokenizer's all_special_ids, which are
  cloze's special ids, [PAD] included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from objectives import IGNORE_INDEX, MLMConfig, TokenInfo, mlm, step_generator
from tests.test_objectives_support import doc_ids_of, tokenizer_token_info

RATE, MASK_FRAC, RANDOM_FRAC = 0.15, 0.8, 0.1
Z = 4.0
"""Tolerance in standard errors."""
TEXTS, PER_BATCH, SEQ_LEN = 600, 50, 512
MIN_LEN, MAX_LEN = 300, 510


def se(p: float, n: int) -> float:
    """Standard error of a binomial proportion p measured on n trials."""
    return math.sqrt(p * (1.0 - p) / n)


@dataclass
class Rates:
    eligible: int
    selected: int
    masked: float
    kept: float
    random: float
    random_special: float
    """Share of selected tokens replaced by a special token other than [MASK]."""
    row_eligible: torch.Tensor
    """Per text: eligible tokens."""
    row_selected: torch.Tensor
    """Per text: selected tokens."""

    @property
    def selection(self) -> float:
        return self.selected / self.eligible


def measure(padded: list[torch.Tensor], outputs: list[torch.Tensor], label_sets: list[torch.Tensor],
            tok: TokenInfo) -> Rates:
    """Rates over batches of [texts, width] tensors: the padded texts, the masked inputs and the labels."""
    special = torch.zeros(tok.vocab_size, dtype=torch.bool)
    special[list(tok.special_ids)] = True
    row_eligible = torch.cat([(~special[p]).sum(1) for p in padded])
    row_selected = torch.cat([(labels != IGNORE_INDEX).sum(1) for labels in label_sets])
    before, after, labels = (torch.cat([x.reshape(-1) for x in xs]) for xs in (padded, outputs, label_sets))
    is_special = special[before]
    selected = labels != IGNORE_INDEX
    assert not (selected & is_special).any(), "a special token or [PAD] was selected"
    assert torch.equal(labels[selected], before[selected]), "labels are not the original tokens"
    assert torch.equal(after[~selected], before[~selected]), "an unselected token changed"
    n = int(selected.sum())
    masked = selected & (after == tok.mask_id)
    kept = selected & (after == before)
    random = selected & ~masked & ~kept
    return Rates(eligible=int((~is_special).sum()), selected=n, masked=int(masked.sum()) / n,
                 kept=int(kept.sum()) / n, random=int(random.sum()) / n,
                 random_special=int((random & special[after]).sum()) / n, row_eligible=row_eligible,
                 row_selected=row_selected)


@pytest.fixture(scope="module")
def both(tiny_data) -> tuple[Rates, Rates, dict, dict, TokenInfo]:
    """(HF rates, cloze rates, HF expected shares, cloze expected shares, TokenInfo) on the same padded rows."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from data.stream import PackedStream

    tok = tokenizer_token_info(tiny_data / "tokenizer" / "spm.model")
    hf_tok = AutoTokenizer.from_pretrained(tiny_data / "tokenizer")  # the files launch.prepare and exports ship
    assert sorted(hf_tok.all_special_ids) == sorted(tok.special_ids), "HF and cloze disagree on the special ids"
    assert (hf_tok.pad_token_id, hf_tok.mask_token_id, len(hf_tok)) == (tok.pad_id, tok.mask_id, tok.vocab_size)
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=RATE, mask_replace_prob=MASK_FRAC,
                                               random_replace_prob=RANDOM_FRAC, seed=0)
    cfg = MLMConfig(rate=RATE, mask_frac=MASK_FRAC, random_frac=RANDOM_FRAC)

    stream = iter(PackedStream(tiny_data, seq_len=SEQ_LEN, batch_size=PER_BATCH, seed=0))
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (TEXTS,), generator=torch.Generator().manual_seed(0))
    sides: dict[str, list[list[torch.Tensor]]] = {"hf": [[], [], []], "cloze": [[], [], []]}
    for i in range(TEXTS // PER_BATCH):
        rows, _ = next(stream)
        texts = [[tok.cls_id, *rows[j, : lengths[i * PER_BATCH + j]].tolist(), tok.sep_id] for j in range(PER_BATCH)]
        width = max(map(len, texts))
        padded = torch.tensor([t + [tok.pad_id] * (width - len(t)) for t in texts])  # right, as hf_tok pads
        out = collator([{"input_ids": t} for t in texts])
        assert out["input_ids"].shape == padded.shape
        for side, (after, labels) in (("hf", (out["input_ids"], out["labels"])),
                                      ("cloze", astuple(mlm(padded, doc_ids_of(padded), step_generator(0, 0, i), tok,
                                                            cfg)))):
            for store, value in zip(sides[side], (padded, after, labels), strict=True):
                store.append(value)
    rates = {side: measure(*values, tok) for side, values in sides.items()}

    V, n_ord = tok.vocab_size, tok.vocab_size - tok.first_ordinary_id
    keep = 1.0 - MASK_FRAC - RANDOM_FRAC
    expected_hf = {"masked": MASK_FRAC + RANDOM_FRAC / V, "kept": keep + RANDOM_FRAC / V,
                   "random": RANDOM_FRAC * (1 - 2 / V), "random_special": RANDOM_FRAC * (len(tok.special_ids) - 1) / V}
    expected_cloze = {"masked": MASK_FRAC, "kept": keep + RANDOM_FRAC / n_ord, "random": RANDOM_FRAC * (1 - 1 / n_ord),
                      "random_special": 0.0}
    return rates["hf"], rates["cloze"], expected_hf, expected_cloze, tok


def astuple(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.labels


def test_enough_tokens_for_a_tight_tolerance(both):
    hf, cloze, *_ = both
    assert hf.eligible == cloze.eligible >= 200_000
    assert Z * se(RATE, hf.eligible) < 0.004, "the selection tolerance is looser than 0.4 points"
    assert Z * se(MASK_FRAC, min(hf.selected, cloze.selected)) < 0.01


def test_selection_rate_matches_nominal_and_each_other(both):
    hf, cloze, *_ = both
    tol = Z * se(RATE, hf.eligible)
    assert abs(hf.selection - RATE) < tol, (hf.selection, tol)
    assert abs(cloze.selection - RATE) < tol, (cloze.selection, tol)
    both_se = math.hypot(se(RATE, hf.eligible), se(RATE, cloze.eligible))
    assert abs(hf.selection - cloze.selection) < Z * both_se, (hf.selection, cloze.selection, Z * both_se)


@pytest.mark.parametrize("share", ["masked", "kept", "random"])
def test_replacement_shares_match_nominal_and_each_other(both, share):
    hf, cloze, expected_hf, expected_cloze, _ = both
    for name, rates, expected in (("hf", hf, expected_hf), ("cloze", cloze, expected_cloze)):
        got, want = getattr(rates, share), expected[share]
        assert abs(got - want) < Z * se(want, rates.selected), (name, share, got, want)
    difference = getattr(hf, share) - getattr(cloze, share)
    expected_difference = expected_hf[share] - expected_cloze[share]
    both_se = math.hypot(se(expected_hf[share], hf.selected), se(expected_cloze[share], cloze.selected))
    assert abs(difference - expected_difference) < Z * both_se, (share, difference, expected_difference)


def test_random_replacements_special_in_hf_only(both):
    """The one difference: HF's random replacement can be a special token (it draws from the whole vocabulary);
    cloze's never is. Should transformers start drawing ordinary ids only, the HF share drops to 0 and this test
    says so; the module docstring then needs updating."""
    hf, cloze, expected_hf, _, _ = both
    assert cloze.random_special == 0.0
    want = expected_hf["random_special"]
    assert abs(hf.random_special - want) < Z * se(want, hf.selected), (hf.random_special, want)
    assert hf.random_special > 0.0


def test_per_text_spread_cloze_meets_each_budget_hf_is_binomial(both):
    """Why the binomial SE bounds cloze's spread: cloze selects within one token of rate x eligible in every text,
    while HF's per-text counts vary as independent draws do. For HF, sum over texts of (selected - p n)^2 / (p (1-p) n)
    is chi-square with one degree of freedom per text (mean k, sd sqrt(2k)); it must lie within Z sd of k."""
    hf, cloze, *_ = both
    budget = RATE * cloze.row_eligible.double()
    assert (cloze.row_selected.double() - budget).abs().max() < 1.0
    n = hf.row_eligible.double()
    chi2 = float((((hf.row_selected.double() - RATE * n) ** 2) / (RATE * (1 - RATE) * n)).sum())
    k = hf.row_eligible.numel()
    assert abs(chi2 - k) < Z * math.sqrt(2 * k), (chi2, k)
