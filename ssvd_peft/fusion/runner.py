"""Running a frozen encoder only as far as its deepest tap, without autograd where none is needed.

Any encoder made of an embedding step and a stack of blocks fits:

    state, mask = embed(x, lengths)                 H_0 = hidden(state)
    state, mask = run_block(block_l, state, mask)   H_l = hidden(state),   l = 1 .. L_max = max S

``state`` is whatever the blocks pass on (ESPnet's relative-position encoders pass (x, pos_emb)
tuples: ``hidden=lambda state: state[0]``); ``mask`` is a bool tensor of valid frames that reshapes
to (B, T) (ESPnet's (B, 1, T) does). Blocks above L_max are never called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion.cache import TapCache
from ssvd_peft.fusion.config import resolve_taps

RunBlock = Callable[[nn.Module, Any, torch.Tensor], tuple[Any, torch.Tensor]]


def call_block(block: nn.Module, state: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The default ``run_block``: ``block(state, mask)``, which returns (state, mask)."""
    return block(state, mask)


def as_hidden(state: Any) -> torch.Tensor:
    """The default ``hidden``: the state is the (B, T, D) hidden state itself."""
    return state


def lengths_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, frames) bool, True on the first lengths[b] frames of row b."""
    return torch.arange(frames, device=lengths.device) < lengths[:, None]


class TappedEncoder(nn.Module):
    """The frozen part of an encoder (``embed`` and ``blocks``) run up to its deepest tap.

    ``forward(x, lengths)`` returns (taps, mask, out_lengths): the hidden states H_l, l in ``taps``
    (sorted), each (B, T', D) with T' = max(out_lengths) and padded frames set to 0; the (B, T')
    bool mask of valid frames; the (B,) out lengths.

    Gradients: when no parameter of ``embed`` or ``blocks`` requires grad (and ``x`` does not), the
    encoder runs under ``torch.no_grad()``: no activations are kept, the taps carry no graph and
    gradients stop at the head. When some do (adapters injected into the blocks), it runs with
    autograd and only those parameters receive gradients.

    Modes: while ``embed`` and ``blocks`` hold no trainable parameter, they stay in eval mode whatever
    the outer model's mode (``train()`` and every forward see to it): dropout inside them is off and
    the taps are deterministic, which the tap cache relies on. With adapters in the blocks they are
    trained, and follow the outer model's mode like any fine-tuned module.

    Cache: with a ``TapCache``, utterances whose taps are on disk are not computed; a batch whose
    utterances are all cached calls neither ``embed`` nor any block. The missing ones of a mixed
    batch are computed together and stored. The cache is refused while the frozen part has trainable
    parameters; it assumes a deterministic front (no SpecAugment or other augmentation on ``x``).
    Entries are keyed by each utterance's input and a fingerprint of the taps and of the frozen
    weights, taken at the first forward with the cache: load the pretrained weights before it.

    ``embed`` must be an ``nn.Module`` (its parameters are seen and it moves with ``.to()``): a module
    whose ``forward(x, lengths)`` returns (state, mask). ``blocks`` is an ``nn.ModuleList`` or a sequence
    of modules; ``run_block(block, state, mask)`` returns (state, mask) and ``hidden(state)`` the
    (B, T, D) tensor of a state (defaults: ``block(state, mask)`` and the state itself). ``taps`` is a
    list of block indices (or 'all'), checked by ``resolve_taps``.
    """

    def __init__(
        self,
        embed: nn.Module,
        blocks: nn.ModuleList | Sequence[nn.Module],
        taps: Sequence[int] | str,
        run_block: RunBlock = call_block,
        hidden: Callable[[Any], torch.Tensor] = as_hidden,
        cache: TapCache | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(embed, nn.Module):
            raise PeftConfigError(
                f"TappedEncoder: embed must be an nn.Module, got {type(embed).__name__}; wrap the "
                "embedding step in a module whose forward(x, lengths) returns (state, mask), so its "
                "parameters are seen and it moves with .to()"
            )
        self.embed = embed
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        self.taps = resolve_taps(taps, len(self.blocks))
        self.run_block = run_block
        self.hidden = hidden
        self.cache = cache
        self.cache_context: bytes | None = None
        if cache is not None:
            self.refuse_cache_if_trainable()
        self.train(self.training)

    def frozen_part(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters of ``embed`` and of the blocks that run (1 .. max tap)."""
        yield from self.embed.named_parameters(prefix="embed")
        yield from self.blocks[: self.taps[-1]].named_parameters(prefix="blocks")

    def trainable_in_frozen_part(self) -> list[str]:
        return [name for name, parameter in self.frozen_part() if parameter.requires_grad]

    def train(self, mode: bool = True) -> TappedEncoder:
        super().train(mode)
        self.keep_frozen_part_in_eval()
        return self

    def keep_frozen_part_in_eval(self) -> None:
        if not self.trainable_in_frozen_part():
            self.embed.eval()
            self.blocks.eval()

    def refuse_cache_if_trainable(self) -> None:
        trainable = self.trainable_in_frozen_part()
        if trainable:
            raise PeftConfigError(
                f"the tap cache needs a frozen encoder, but {len(trainable)} parameters of its embed/"
                f"blocks require grad (e.g. {trainable[0]}), so the taps change during training; "
                "drop the cache (cache_dir: null) or freeze those parameters"
            )

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return self.compute(x, lengths)
        return self.cached(x, lengths, self.cache)

    def compute(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Run embed and blocks 1 .. max tap on the batch; autograd only where a gradient is wanted."""
        self.keep_frozen_part_in_eval()
        needs_graph = x.requires_grad or bool(self.trainable_in_frozen_part())
        taps: list[torch.Tensor] = []
        with nullcontext() if needs_graph else torch.no_grad():
            state, mask = self.embed(x, lengths)
            if 0 in self.taps:
                taps.append(self.hidden(state))
            for index, block in enumerate(self.blocks[: self.taps[-1]], start=1):
                state, mask = self.run_block(block, state, mask)
                if index in self.taps:
                    taps.append(self.hidden(state))
        valid = mask.reshape(mask.shape[0], -1).bool()
        out_lengths = valid.sum(dim=-1)
        frames = int(out_lengths.max())
        valid = valid[:, :frames]
        return [tap[:, :frames].masked_fill(~valid[..., None], 0) for tap in taps], valid, out_lengths

    def cached(
        self, x: torch.Tensor, lengths: torch.Tensor, cache: TapCache
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Taps of the cached utterances read from disk, the others computed (together) and stored."""
        self.refuse_cache_if_trainable()
        if x.requires_grad:
            raise PeftConfigError(
                "the tap cache needs an input without gradient, but x requires grad (a trainable "
                "front end before the encoder); drop the cache or freeze the front end"
            )
        if self.cache_context is None:
            self.cache_context = self.fingerprint()
        keys = [cache.key(x[b, :length], self.cache_context) for b, length in enumerate(lengths.tolist())]
        found = [cache.load(key) for key in keys]
        utterances: list[list[torch.Tensor] | None] = [
            None if stored is None else [stored[tap].to(x.device) for tap in self.taps] for stored in found
        ]
        missing = [b for b, taps in enumerate(utterances) if taps is None]
        if missing:
            taps, _, out_lengths = self.compute(x[missing], lengths[missing])
            for row, (b, length) in enumerate(zip(missing, out_lengths.tolist(), strict=True)):
                utterances[b] = [tap[row, :length] for tap in taps]
                cache.store(keys[b], dict(zip(self.taps, utterances[b], strict=True)))
        ready = [taps for taps in utterances if taps is not None]
        out_lengths = torch.tensor([taps[0].shape[0] for taps in ready], device=x.device)
        batch_taps = [
            pad_sequence([taps[p] for taps in ready], batch_first=True) for p in range(len(self.taps))
        ]
        return batch_taps, lengths_mask(out_lengths, batch_taps[0].shape[1]), out_lengths

    def fingerprint(self) -> bytes:
        """The taps, and per tensor of the frozen part its name, shape, dtype, float64 sum and sum of
        squares: another checkpoint or tap set gives another fingerprint."""
        parts = [repr(self.taps)]
        states = (
            self.embed.state_dict(prefix="embed."),
            self.blocks[: self.taps[-1]].state_dict(prefix="blocks."),
        )
        for state in states:
            for name, tensor in state.items():
                values = tensor.detach().double()
                sums = torch.stack([values.sum(), values.square().sum()]).tolist()
                parts.append(f"{name}{tuple(tensor.shape)}{tensor.dtype}{sums}")
        return "\n".join(parts).encode()
