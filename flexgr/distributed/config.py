"""How the world is split into data-parallel replicas and context-parallel groups."""

from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """The ``parallel`` settings cannot be realised on this world size."""


@dataclass(frozen=True)
class ParallelConfig:
    """``dp`` data-parallel replicas, each made of ``cp`` context-parallel ranks.

    ``dp`` left at 1 means "whatever ``cp`` leaves": under torchrun with ``--nproc-per-node 4``
    and ``cp=2``, dp becomes 2. That is what ``--set parallel.cp=C`` on its own should mean, and a
    world with ranks that do nothing is never wanted. Set ``dp`` above 1 to have dp * cp checked
    against the world size.
    """

    dp: int = 1
    cp: int = 1

    def resolve(self, world_size: int) -> ParallelConfig:
        """The concrete (dp, cp) for ``world_size`` ranks, or a ParallelConfigError saying why not."""
        if world_size < 1:
            raise ParallelConfigError(f"world_size must be >= 1, got {world_size}")
        if self.cp < 1:
            raise ParallelConfigError(f"parallel.cp must be >= 1, got {self.cp}")
        if self.dp < 1:
            raise ParallelConfigError(f"parallel.dp must be >= 1, got {self.dp}")
        if world_size % self.cp != 0:
            raise ParallelConfigError(
                f"parallel.cp={self.cp} does not divide the world size {world_size}: "
                f"launch a multiple of {self.cp} processes or pick a cp that divides {world_size}"
            )
        if self.dp == 1:
            return ParallelConfig(dp=world_size // self.cp, cp=self.cp)
        if self.dp * self.cp != world_size:
            raise ParallelConfigError(
                f"conflicting parallel settings: parallel.dp={self.dp} x parallel.cp={self.cp} = "
                f"{self.dp * self.cp} ranks, but the world has {world_size}; leave parallel.dp "
                f"unset (1) to derive it as world_size / cp"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.cp
