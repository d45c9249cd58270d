"""The Circle loss's scalars as one value: ``m``, ``gamma`` and the variant, validated once.

Every backend needs the same five numbers derived from them (the α offsets o_p, o_n, the
targets Δp, Δn and the scale γ); :class:`CircleMargins` carries them from the public call
down to the kernels, where op schemas take them as one ``float[]`` argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Variant = Literal["original", "dcr"]
VARIANTS = ("original", "dcr")


@dataclass(frozen=True)
class CircleMargins:
    """α_p = [o_p - s]₊, α_n = [s - o_n]₊ (detached), targets Δp = 1 - m, Δn = m, scale γ.

    ``variant="original"`` (Sun et al. 2020, PML): o_p = 1 + m, o_n = -m.
    ``variant="dcr"`` (the DCR paper's appendix A.8): o_p = 1 - m, o_n = m.
    """

    m: float = 0.4
    gamma: float = 80.0
    variant: Variant = "original"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not _is_real(self.m) or not 0.0 <= self.m <= 1.0:
            raise ValueError(f"m must be a number in [0, 1], got {self.m!r}")
        if not _is_real(self.gamma) or not 0.0 < self.gamma < math.inf:
            raise ValueError(f"gamma must be a positive finite number, got {self.gamma!r}")
        object.__setattr__(self, "m", float(self.m))
        object.__setattr__(self, "gamma", float(self.gamma))

    @property
    def o_p(self) -> float:
        return 1 + self.m if self.variant == "original" else 1 - self.m

    @property
    def o_n(self) -> float:
        return -self.m if self.variant == "original" else self.m

    @property
    def delta_p(self) -> float:
        return 1 - self.m

    @property
    def delta_n(self) -> float:
        return self.m

    def scalars(self) -> list[float]:
        """``[o_p, o_n, delta_p, delta_n, gamma]``: the order every op and kernel takes them in."""
        return [self.o_p, self.o_n, self.delta_p, self.delta_n, self.gamma]


def _is_real(v) -> bool:
    """An int or float (not a bool, which Python counts as an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)
