"""Gaussian noise regenerated from integer seeds, never stored.

Every parameter tensor gets its own stream, derived from the member's seed and the parameter's name, so tensors of
the same shape receive independent noise (re-seeding one generator with the member seed for every tensor, as the
ES-at-scale reference code does, hands every same-shaped layer the same noise).
"""

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part; stable across processes, platforms and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class GaussianNoise:
    """Standard normal noise for one (member seed, parameter name) pair, always drawn in float32."""

    def sample(self, member_seed: int, name: str, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(member_seed, name))
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
