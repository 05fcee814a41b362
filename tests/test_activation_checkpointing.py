"""Activation checkpointing: the same loss and gradients as without, recomputation only in a training forward,
compiled blocks compiled inside the checkpoint, the config's checks, and the `--dry-run` activation formula
against the bytes a forward really keeps alive."""

from __future__ import annotations

import pytest
import torch

from bench.activation_memory import measure
from launch.config import ConfigError, load_config
from launch.train.dry_run import activation_bytes
from model.config import EncoderConfig
from model.encoder import compile_layers
from model.heads import EncoderForPretraining
from tests.conftest import ROOT, run_cli

CFG = EncoderConfig(vocab_size=300, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=48,
                    max_position_embeddings=64)


def batch(attention: str):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(9, CFG.vocab_size, (2, 24), generator=gen)
    labels = torch.where(torch.rand(2, 24, generator=gen) < 0.4, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    prefix_len = torch.tensor([5, 12]) if attention == "prefix" else None
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids, "attention": attention, "prefix_len": prefix_len}


def loss_and_grads(every: int, attention: str, compile_backend=None):
    torch.manual_seed(0)
    model = EncoderForPretraining(CFG)
    model.encoder.set_activation_checkpointing(every)
    if compile_backend is not None:
        compile_layers(model, backend=compile_backend)
    loss = model(**batch(attention)).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("attention", ["bidirectional", "causal", "prefix"])
def test_checkpointing_gives_the_same_loss_and_gradients(every, attention):
    """fp32 on CPU, packed rows (the document mask) under each pattern: tolerance 0. The blocks hold no dropout
    or other randomness and the recomputation runs the same kernels on the same inputs, so every bit agrees."""
    loss, grads = loss_and_grads(0, attention)
    loss_ckpt, grads_ckpt = loss_and_grads(every, attention)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads_ckpt[name]), name


def count_block_calls(model: EncoderForPretraining) -> list[int]:
    calls = [0]
    for layer in model.encoder.layers:
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("every, recomputed", [(0, 0), (1, 4), (2, 2), (3, 2)])
def test_backward_recomputes_exactly_the_chosen_blocks(every, recomputed):
    model = EncoderForPretraining(CFG)
    model.encoder.set_activation_checkpointing(every)
    calls = count_block_calls(model)
    loss = model(**batch("causal")).loss
    assert calls[0] == 4
    loss.backward()
    assert calls[0] == 4 + recomputed  # blocks i with i % every == 0 ran their forward again


def test_no_recomputation_outside_a_training_forward():
    """Evaluation (eval mode) and no-grad forwards keep nothing for backward, so checkpointing is skipped."""
    model = EncoderForPretraining(CFG)
    model.encoder.set_activation_checkpointing(1)
    calls = count_block_calls(model)
    model.eval()
    model(**batch("bidirectional")).loss.backward()
    assert calls[0] == 4  # eval mode with grad: plain blocks, backward runs nothing again
    model.train()
    with torch.no_grad():
        model(**batch("bidirectional"))
    assert calls[0] == 8


def test_compiled_blocks_run_compiled_inside_the_checkpoint():
    """compile_layers under checkpointing: the checkpoint wraps the compiled block, so both the forward and the
    backward's recomputation run the compiled graph (fullgraph: a graph break would be an error), with the same
    loss and gradients as the uncompiled model without checkpointing."""
    # dynamo's recompile count is per process: layers compiled by earlier tests in this worker must not use it up
    torch._dynamo.reset()
    graphs, runs = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            runs.append(1)
            return gm(*args)
        return run

    loss, grads = loss_and_grads(0, "prefix")
    loss_c, grads_c = loss_and_grads(1, "prefix", compile_backend=backend)
    assert len(graphs) >= 1 and len(runs) == 2 * CFG.num_layers  # 4 forwards + 4 recomputations
    assert torch.equal(loss, loss_c)
    for name, g in grads.items():
        assert torch.allclose(g, grads_c[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_encoder_refuses_a_bad_setting(bad):
    model = EncoderForPretraining(CFG)
    with pytest.raises(ValueError, match="activation checkpointing every="):
        model.encoder.set_activation_checkpointing(bad)


@pytest.mark.parametrize("overrides, needle", [
    (["train.activation_checkpointing=some"],
     "train.activation_checkpointing: must be none, full or every_n, got 'some'"),
    (["train.activation_checkpointing=every_n", "train.activation_checkpointing_every=0"],
     "train.activation_checkpointing_every: must be >= 1, got 0"),
])
def test_config_names_the_key_and_the_valid_values(overrides, needle, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "launch/configs/tiny.yaml", [f"data.path={tmp_path}", *overrides])
    assert len(e.value.problems) == 1 and needle in e.value.problems[0]


@pytest.mark.parametrize("mode, every, want", [("none", 3, 0), ("full", 3, 1), ("every_n", 3, 3)])
def test_config_setting_reaches_the_encoder_as_every(mode, every, want, tmp_path):
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", [f"data.path={tmp_path}",
                                                          f"train.activation_checkpointing={mode}",
                                                          f"train.activation_checkpointing_every={every}"])
    assert cfg.train.recompute_every() == want


@pytest.mark.parametrize("every, head_loss", [(0, "plain"), (1, "plain"), (2, "plain"), (0, "fused"),
                                             (1, "fused")])
def test_activation_formula_matches_the_bytes_a_forward_keeps(every, head_loss):
    """launch.train.dry_run.activation_bytes against bench.activation_memory.measure: every storage an op allocates
    in an fp32 forward of packed rows, alive once the forward has returned. Within 1% (the formula leaves out a few
    scalars; at this size it agrees to 0.5%)."""
    cfg = EncoderConfig(vocab_size=1000, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
                        max_position_embeddings=256)
    measured = measure(cfg, micro=2, seq=128, every=every, labelled_fraction=0.25, backward=False,
                       head_loss=head_loss)
    formula = activation_bytes(cfg, micro=2, seq=128, precision="fp32", labelled_fraction=0.25,
                               checkpoint_every=every, head_loss=head_loss)
    assert formula["held"] == pytest.approx(measured.held, rel=0.01), (formula, measured)
    if every:  # and checkpointing really keeps less: about a fifth (full), three fifths (every 2) here
        assert measured.held < 0.75 * measure(cfg, micro=2, seq=128, every=0, labelled_fraction=0.25,
                                             backward=False, head_loss=head_loss).held


def test_dry_run_shows_activations_with_and_without_checkpointing(tiny_data):
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--dry-run", "--nproc", "2",
                    f"data.path={tiny_data}", "train.activation_checkpointing=every_n",
                    "train.activation_checkpointing_every=2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "activation checkpointing every_n)" in proc.stdout
    assert "activations, without checkpointing:" in proc.stdout
    assert "activations, checkpointing every_n, n=2:" in proc.stdout
    assert "while a block is recomputed" in proc.stdout
