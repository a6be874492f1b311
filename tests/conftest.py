"""A tiny ESPnet-shaped ASR model shared by the configuration, injection and budget specifications.

Module names follow ESPnet's Transformer/Conformer ASR models:

    encoder.encoders.N.self_attn.{linear_q, linear_k, linear_v, linear_out}     16 -> 16
    encoder.encoders.N.feed_forward.w_1                                          16 -> 24 (tall)
    encoder.encoders.N.feed_forward.w_2                                          24 -> 16 (wide)
    encoder.encoders.N.norm1, encoder.after_norm                                 LayerNorm
    decoder.decoders.N.{self_attn, src_attn}.{linear_q, linear_k, linear_v, linear_out}
    decoder.decoders.N.feed_forward.{w_1, w_2}
    ctc.ctc_lo                                                                   16 -> 10

The forward calls every Linear, so an adapter anywhere changes the output.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

SIZE = 16
HIDDEN = 24
VOCAB = 10
LAYERS = 2


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_q = nn.Linear(SIZE, SIZE)
        self.linear_k = nn.Linear(SIZE, SIZE)
        self.linear_v = nn.Linear(SIZE, SIZE)
        self.linear_out = nn.Linear(SIZE, SIZE)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        scores = self.linear_q(query) @ self.linear_k(memory).transpose(-1, -2) / math.sqrt(SIZE)
        return self.linear_out(scores.softmax(dim=-1) @ self.linear_v(memory))


class TinyFeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_1 = nn.Linear(SIZE, HIDDEN)
        self.w_2 = nn.Linear(HIDDEN, SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class TinyEncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = TinyAttention()
        self.feed_forward = TinyFeedForward()
        self.norm1 = nn.LayerNorm(SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.self_attn(normed, normed)
        return x + self.feed_forward(x)


class TinyDecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = TinyAttention()
        self.src_attn = TinyAttention()
        self.feed_forward = TinyFeedForward()

    def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = y + self.self_attn(y, y)
        y = y + self.src_attn(y, memory)
        return y + self.feed_forward(y)


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(TinyEncoderLayer() for _ in range(LAYERS))
        self.after_norm = nn.LayerNorm(SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoders:
            x = layer(x)
        return self.after_norm(x)


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoders = nn.ModuleList(TinyDecoderLayer() for _ in range(LAYERS))

    def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.decoders:
            y = layer(y, memory)
        return y


class TinyCtc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ctc_lo = nn.Linear(SIZE, VOCAB)


class TinyAsrModel(nn.Module):
    """Encoder, attention decoder and CTC head; the output concatenates CTC logits and decoder states."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = TinyEncoder()
        self.decoder = TinyDecoder()
        self.ctc = TinyCtc()

    def forward(self, speech: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(speech)
        logits = self.ctc.ctc_lo(memory)
        states = self.decoder(text, memory)
        return torch.cat([logits.flatten(1), states.flatten(1)], dim=1)


def pytest_configure(config: pytest.Config) -> None:
    """Tiny tensors run fastest on one thread; more threads only contend on a shared CPU."""
    torch.set_num_threads(1)


@pytest.fixture
def tiny_asr() -> TinyAsrModel:
    """A freshly initialised model, the same weights in every test."""
    torch.manual_seed(0)
    return TinyAsrModel().eval()


@pytest.fixture
def asr_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(speech features: 2 x 5 x 16, decoder inputs: 2 x 3 x 16)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, SIZE, generator=generator), torch.randn(2, 3, SIZE, generator=generator)
