"""TapCache: a warm cache runs no block, cached training equals uncached training, the disk budget
holds, and the cache is refused where taps would change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_encoder import block_calls, toy_batch, toy_encoder, toy_fusion

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion import FeatureFusion, TapCache, TappedEncoder

BATCHES = [[10, 7, 9], [8, 8, 5], [12, 6, 11]]


def cached_encoder(directory: Path, max_bytes: int = 10**8, taps=(0, 2, 3)) -> TappedEncoder:
    embed, blocks = toy_encoder()
    return TappedEncoder(embed, blocks, list(taps), cache=TapCache(directory, max_bytes))


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())


def test_a_warm_cache_runs_neither_embed_nor_any_block(tmp_path: Path) -> None:
    encoder = cached_encoder(tmp_path)
    batch = toy_batch([10, 7, 9])
    cold, cold_mask, cold_lengths = encoder(*batch)
    assert len(encoder.cache) == 3
    calls = [encoder.embed.calls, *(block.calls for block in encoder.blocks)]
    warm, warm_mask, warm_lengths = encoder(*batch)
    assert [encoder.embed.calls, *(block.calls for block in encoder.blocks)] == calls
    assert all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
    assert torch.equal(cold_mask, warm_mask)
    assert torch.equal(cold_lengths, warm_lengths)


def test_cached_taps_equal_computed_taps_in_their_dtype(tmp_path: Path) -> None:
    encoder = cached_encoder(tmp_path).double()
    x, lengths = toy_batch([10, 7, 9])
    computed, _, _ = encoder(x.double(), lengths)
    reread = cached_encoder(tmp_path).double()
    reread.load_state_dict(encoder.state_dict())
    cached, _, _ = reread(x.double(), lengths)
    assert sum(block.calls for block in reread.blocks) == 0
    assert all(tap.dtype == torch.float64 for tap in cached)
    assert all(torch.equal(a, b) for a, b in zip(computed, cached, strict=True))


def test_a_mixed_batch_computes_only_the_missing_utterances(tmp_path: Path) -> None:
    encoder = cached_encoder(tmp_path)
    x, lengths = toy_batch([10, 7, 9, 6])
    encoder(x[:2], lengths[:2])
    rows_before = encoder.blocks[0].rows
    mixed, mask, _ = encoder(x, lengths)
    assert encoder.blocks[0].rows - rows_before == 2
    plain = TappedEncoder(encoder.embed, encoder.blocks, encoder.taps)
    expected, expected_mask, _ = plain(x, lengths)
    assert torch.equal(mask, expected_mask)
    for a, b in zip(mixed, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_the_disk_budget_is_never_exceeded_and_the_rest_is_computed(tmp_path: Path) -> None:
    x, lengths = toy_batch([10] * 6)
    probe = cached_encoder(tmp_path / "probe")
    probe(x[:1], lengths[:1])
    one_file = disk_bytes(tmp_path / "probe")
    budget = 2 * one_file + one_file // 2
    encoder = cached_encoder(tmp_path / "cache", max_bytes=budget)
    plain = TappedEncoder(encoder.embed, encoder.blocks, encoder.taps)
    for start in range(0, 6, 2):
        taps, _, _ = encoder(x[start : start + 2], lengths[start : start + 2])
        expected, _, _ = plain(x[start : start + 2], lengths[start : start + 2])
        assert all(torch.equal(a, b) for a, b in zip(taps, expected, strict=True))
        assert disk_bytes(tmp_path / "cache") <= budget
    assert len(encoder.cache) == 2
    rows_before = encoder.blocks[0].rows
    again, _, _ = encoder(x, lengths)
    assert encoder.blocks[0].rows - rows_before == 4
    for a, b in zip(again, plain(x, lengths)[0], strict=True):
        torch.testing.assert_close(a, b)


def test_a_new_cache_on_the_same_directory_reads_the_files_there(tmp_path: Path) -> None:
    cached_encoder(tmp_path)(*toy_batch([10, 7, 9]))
    cache = TapCache(tmp_path, 10**8)
    assert len(cache) == 3
    assert cache.size_bytes == disk_bytes(tmp_path)


def test_the_key_is_the_utterances_content_and_the_context() -> None:
    utterance = torch.randn(7, 6)
    padded = torch.cat([utterance, torch.randn(3, 6)])
    assert TapCache.key(padded[:7]) == TapCache.key(utterance)
    assert TapCache.key(utterance[:6]) != TapCache.key(utterance)
    assert TapCache.key(utterance.double()) != TapCache.key(utterance)
    assert TapCache.key(utterance, b"encoder A") != TapCache.key(utterance, b"encoder B")


def test_other_frozen_weights_or_taps_do_not_read_the_old_entries(tmp_path: Path) -> None:
    batch = toy_batch([10, 7])
    first = cached_encoder(tmp_path)
    first(*batch)
    changed = cached_encoder(tmp_path)
    changed.load_state_dict(first.state_dict())
    with torch.no_grad():
        changed.blocks[1].w_1.weight[0, 0] += 1e-3
    changed(*batch)
    assert changed.blocks[0].calls == 1
    other_taps = cached_encoder(tmp_path, taps=(0, 2))
    other_taps.load_state_dict(first.state_dict())
    other_taps(*batch)
    assert other_taps.blocks[0].calls == 1


def test_the_cache_is_refused_when_the_frozen_part_has_trainable_parameters(tmp_path: Path) -> None:
    embed, blocks = toy_encoder(adapted_block=2)
    with pytest.raises(PeftConfigError, match=r"tap cache needs a frozen encoder.*blocks\.1\.delta"):
        TappedEncoder(embed, blocks, [0, 3], cache=TapCache(tmp_path, 10**6))
    encoder = cached_encoder(tmp_path)
    encoder.blocks[0].w_1.weight.requires_grad_(True)
    with pytest.raises(PeftConfigError, match="drop the cache"):
        encoder(*toy_batch([8, 6]))


def train(fusion: FeatureFusion, epochs: list[Path | None], seed: int = 7) -> list[list[int]]:
    """Adam on a masked squared error over BATCHES, one epoch per entry of ``epochs`` (the directory of
    the tap cache opened for it, or None); returns the block calls of each epoch."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(fusion.trainable_parameters(), lr=0.05)
    fusion.train()
    calls = []
    for directory in epochs:
        fusion.encoder.cache = None if directory is None else TapCache(directory, 10**8)
        before = block_calls(fusion)
        for index, lengths in enumerate(BATCHES):
            x, lengths = toy_batch(lengths, seed=index)
            z, out_lengths = fusion(x, lengths)
            target = torch.sin(torch.arange(z.shape[1] * z.shape[2], dtype=z.dtype)).reshape(z.shape[1:])
            valid = torch.arange(z.shape[1]) < out_lengths[:, None]
            loss = ((z - target) ** 2)[valid].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        calls.append([after - start for after, start in zip(block_calls(fusion), before, strict=True)])
    return calls


@pytest.mark.parametrize("variant", ["weighted_sum", "ladder"])
def test_cached_and_uncached_training_reach_identical_heads(tmp_path: Path, variant: str) -> None:
    uncached = toy_fusion(variant)
    cached = toy_fusion(variant)
    train(uncached, [None, None])
    calls = train(cached, [tmp_path, tmp_path])
    assert calls == [[3, 3, 3, 0], [0, 0, 0, 0]]
    trained, initial = cached.head.state_dict(), toy_fusion(variant).head.state_dict()
    assert all(torch.equal(uncached.head.state_dict()[name], trained[name]) for name in trained)
    assert not all(torch.equal(initial[name], trained[name]) for name in trained)
