"""Toy sequence-to-sequence tasks: copy, reverse and sort random token sequences.

Token ids: ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``, content tokens ``3 .. vocab_size - 1``.
Sequences have a random length in ``[min_len, max_len]`` and are right-padded.

Batch shapes::

    src                    (B, S)      content tokens, padded to the longest in the batch
    tgt_in                 (B, S + 1)  BOS + target, padded
    tgt_out                (B, S + 1)  target + EOS, padded
    src_key_padding_mask   (B, S)      bool, True = padding
    tgt_key_padding_mask   (B, S + 1)  bool, True = padding (same positions in tgt_in and tgt_out)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "Batch", "CopyTask", "ReverseTask", "SortTask", "ToyTask"]

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
FIRST_TOKEN = 3


@dataclass
class Batch:
    """One padded batch of a toy task (shapes in the module docstring)."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    src_key_padding_mask: Tensor
    tgt_key_padding_mask: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.src, self.tgt_in, self.tgt_out, self.src_key_padding_mask, self.tgt_key_padding_mask)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in ``src`` and ``tgt_in``."""
        return int((~self.src_key_padding_mask).sum() + (~self.tgt_key_padding_mask).sum())


class ToyTask:
    """Base class: random sequences and their targets; subclasses define ``target``.

    Args:
        vocab_size: total vocabulary including PAD/BOS/EOS (at least 4).
        min_len: shortest sequence (at least 1).
        max_len: longest sequence.
    """

    name = "toy"
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, vocab_size: int = 32, min_len: int = 1, max_len: int = 16) -> None:
        if vocab_size <= FIRST_TOKEN:
            raise ValueError(
                f"vocab_size must be greater than {FIRST_TOKEN} (PAD, BOS, EOS + tokens), got {vocab_size}"
            )
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        self.vocab_size = vocab_size
        self.min_len = min_len
        self.max_len = max_len

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(vocab_size={self.vocab_size}, min_len={self.min_len}, max_len={self.max_len})"

    @property
    def max_target_len(self) -> int:
        """Length of ``tgt_in`` / ``tgt_out`` for the longest sequence (target + EOS)."""
        return self.max_len + 1

    def target(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Targets for right-padded ``tokens`` (B, S) with ``lengths`` (B,); padding stays PAD."""
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A random batch drawn from ``generator`` (CPU tensors)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        lengths = torch.randint(self.min_len, self.max_len + 1, (batch_size,), generator=generator)  # (B,)
        width = int(lengths.max())
        tokens = torch.randint(FIRST_TOKEN, self.vocab_size, (batch_size, width), generator=generator)
        positions = torch.arange(width)[None, :]  # (1, S)
        src_pad = positions >= lengths[:, None]  # (B, S)
        src = tokens.masked_fill(src_pad, PAD_ID)
        target = self.target(src, lengths)  # (B, S)

        pad_column = torch.full((batch_size, 1), PAD_ID, dtype=torch.long)
        tgt_in = torch.cat([torch.full((batch_size, 1), BOS_ID, dtype=torch.long), target], dim=1)
        tgt_out = torch.cat([target, pad_column], dim=1)  # (B, S + 1)
        tgt_out.scatter_(1, lengths[:, None], EOS_ID)
        tgt_pad = torch.arange(width + 1)[None, :] > lengths[:, None]  # (B, S + 1)
        tgt_in = tgt_in.masked_fill(tgt_pad, PAD_ID)
        return Batch(src, tgt_in, tgt_out, src_pad, tgt_pad)

    def eval_set(self, num_batches: int, batch_size: int, seed: int) -> list[Batch]:
        """Held-out batches from their own seeded generator (pick a seed other than training's)."""
        generator = torch.Generator().manual_seed(seed)
        return [self.sample(batch_size, generator) for _ in range(num_batches)]


class CopyTask(ToyTask):
    """Target = source."""

    name = "copy"

    def target(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        return tokens.clone()


class ReverseTask(ToyTask):
    """Target = source reversed (within its own length)."""

    name = "reverse"

    def target(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1])[None, :]  # (1, S)
        source_index = (lengths[:, None] - 1 - positions).clamp(min=0)  # (B, S)
        reversed_tokens = tokens.gather(1, source_index)
        return reversed_tokens.masked_fill(positions >= lengths[:, None], PAD_ID)


class SortTask(ToyTask):
    """Target = source tokens sorted ascending."""

    name = "sort"

    def target(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        pad = tokens == PAD_ID
        # Padding sorts last because it is replaced by a value above every token.
        ordered = tokens.masked_fill(pad, self.vocab_size).sort(dim=1).values
        return ordered.masked_fill(ordered == self.vocab_size, PAD_ID)
