"""MLM masking (BERT recipe) that is a pure function of (seed, epoch, sample id).

15% of real text tokens are chosen; of those 80% become [MASK], 10% a random token, 10% stay.
[CLS], [SEP] and padding are never chosen. The random draws come from a torch.Generator seeded
from a hash of (seed, epoch, sample id, caption slot), so a run resumed mid-epoch, on any number
of ranks or workers, masks every caption exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib

import torch

IGNORE_INDEX = -100


def sample_generator(seed: int, epoch: int, sample_id: int, slot: int = 0) -> torch.Generator:
    """A CPU generator seeded from a stable hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}:{slot}".encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def mask_tokens(
    ids: torch.Tensor,
    special_mask: torch.Tensor,
    generator: torch.Generator,
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask one caption. ids, special_mask: (L,) long/bool -> (masked ids, labels) both (L,) long.

    `special_mask` is True at [CLS]/[SEP]/padding. Labels hold the original id at chosen positions
    and IGNORE_INDEX elsewhere.
    """
    # Draw every random number up front, in a fixed order, so results depend only on the seed.
    choose = torch.rand(ids.shape, generator=generator) < probability
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)

    choose &= ~special_mask
    labels = torch.where(choose, ids, torch.full_like(ids, IGNORE_INDEX))
    masked = ids.clone()
    masked[choose & (action < 0.8)] = mask_id
    use_random = choose & (action >= 0.8) & (action < 0.9)
    masked[use_random] = random_ids[use_random]
    return masked, labels


def mask_captions(
    ids: torch.Tensor,
    special_mask: torch.Tensor,
    seed: int,
    epoch: int,
    sample_id: int,
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the captions of one image sample. ids: (C, L) -> (masked ids, labels) (C, L)."""
    masked_rows, label_rows = [], []
    for slot in range(ids.shape[0]):
        generator = sample_generator(seed, epoch, sample_id, slot)
        masked, labels = mask_tokens(
            ids[slot], special_mask[slot], generator, mask_id, vocab_size, probability
        )
        masked_rows.append(masked)
        label_rows.append(labels)
    return torch.stack(masked_rows), torch.stack(label_rows)
