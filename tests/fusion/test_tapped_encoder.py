"""TappedEncoder: the right hidden states, no block above the deepest tap, no autograd and no dropout
in the frozen part, autograd where adapters need it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_encoder import DIM, NUM_BLOCKS, toy_batch, toy_encoder

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion import TappedEncoder


def reference_hidden_states(embed, blocks, x, lengths) -> list[torch.Tensor]:
    """H_0 .. H_L of the encoder run by hand, in eval mode."""
    embed.eval()
    blocks.eval()
    state, mask = embed(x, lengths)
    states = [state]
    for block in blocks:
        state, mask = block(state, mask)
        states.append(state)
    return states


def test_taps_are_the_hidden_states_with_padding_cut_and_zeroed() -> None:
    embed, blocks = toy_encoder()
    x, lengths = toy_batch([10, 7, 9])
    taps, mask, out_lengths = TappedEncoder(embed, blocks, [0, 2, 4])(x, lengths)
    expected = reference_hidden_states(embed, blocks, x, lengths)
    assert out_lengths.tolist() == [5, 3, 4]
    assert torch.equal(mask, torch.arange(5) < torch.tensor([5, 3, 4])[:, None])
    for tap, state in zip(taps, [expected[0], expected[2], expected[4]], strict=True):
        assert tap.shape == (3, 5, DIM)
        assert torch.equal(tap[mask], state[mask])
        assert torch.all(tap[~mask] == 0)


def test_the_output_is_cut_to_the_longest_utterance() -> None:
    embed, blocks = toy_encoder()
    x, lengths = toy_batch([6, 4])
    padded = torch.cat([x, torch.randn(2, 8, x.shape[-1])], dim=1)
    encoder = TappedEncoder(embed, blocks, [1])
    taps, _, _ = encoder(padded, lengths)
    assert taps[0].shape == (2, 3, DIM)
    torch.testing.assert_close(taps[0], encoder(x, lengths)[0][0])


@pytest.mark.parametrize(("taps", "runs"), [([0], 0), ([0, 2], 2), ([1, 3], 3), ("all", NUM_BLOCKS)])
def test_blocks_above_the_deepest_tap_never_run(taps, runs: int) -> None:
    embed, blocks = toy_encoder()
    TappedEncoder(embed, blocks, taps)(*toy_batch([8, 6]))
    assert [block.calls for block in blocks] == [1] * runs + [0] * (NUM_BLOCKS - runs)


def test_a_frozen_encoder_runs_without_autograd() -> None:
    embed, blocks = toy_encoder()
    taps, _, _ = TappedEncoder(embed, blocks, [0, 2])(*toy_batch([8, 6]))
    assert blocks[0].grad_enabled is False
    assert not any(tap.requires_grad for tap in taps)


def test_the_frozen_part_stays_in_eval_mode_and_its_taps_are_deterministic() -> None:
    embed, blocks = toy_encoder()
    embed.train()
    blocks.train()
    encoder = TappedEncoder(embed, blocks, [0, 2]).train()
    assert encoder.training
    assert not any(module.training for module in [*embed.modules(), *blocks.modules()])
    embed.train()
    batch = toy_batch([8, 6])
    first, _, _ = encoder(*batch)
    second, _, _ = encoder(*batch)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not embed.training


def test_adapters_in_a_block_run_with_autograd_and_follow_the_outer_mode() -> None:
    embed, blocks = toy_encoder(adapted_block=2)
    encoder = TappedEncoder(embed, blocks, [0, 3]).train()
    taps, mask, _ = encoder(*toy_batch([8, 6]))
    assert blocks[2].grad_enabled is True
    assert blocks[2].training
    taps[1][mask].sum().backward()
    assert blocks[1].delta.grad is not None
    assert all(p.grad is None for name, p in blocks.named_parameters() if not name.endswith("delta"))
    assert all(p.grad is None for p in embed.parameters())


def test_state_tuples_and_a_custom_block_call() -> None:
    """ESPnet's relative-position encoders pass (x, pos_emb) on: hidden picks x."""
    embed, blocks = toy_encoder()

    class TupleEmbed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = embed

        def forward(self, x, lengths):
            state, mask = self.inner(x, lengths)
            return (state, torch.zeros(1)), mask

    def run_block(block, state, mask):
        hidden, position = state
        hidden, mask = block(hidden, mask)
        return (hidden, position + 1), mask

    x, lengths = toy_batch([8, 6])
    encoder = TappedEncoder(TupleEmbed(), blocks, [1, 3], run_block=run_block, hidden=lambda state: state[0])
    taps, mask, _ = encoder(x, lengths)
    expected = reference_hidden_states(embed, blocks, x, lengths)
    assert torch.equal(taps[1][mask], expected[3][mask])


def test_embed_must_be_a_module() -> None:
    _, blocks = toy_encoder()
    with pytest.raises(PeftConfigError, match=r"embed must be an nn\.Module, got function; wrap"):
        TappedEncoder(lambda x, lengths: (x, lengths), blocks, [0])


def test_taps_are_checked_against_the_blocks() -> None:
    embed, blocks = toy_encoder()
    with pytest.raises(PeftConfigError, match=r"tap 5 is out of range.*0 .*\.\. 4"):
        TappedEncoder(embed, blocks, [0, 5])
