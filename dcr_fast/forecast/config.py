"""The settings of one forecast: every field is also a ``dcr-fast forecast`` flag and a YAML key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dcr_fast.forecast.params import PARAM_SETS, ParamSetOptions


@dataclass(frozen=True)
class ForecastConfig:
    """What is forecast and how; see :mod:`dcr_fast.forecast` for the quantity itself."""

    param_set: str = field(default="tail", metadata={"help": f"parameters of the forecast step: {', '.join(PARAM_SETS)}"})
    tail_layers: int = field(default=1, metadata={"help": "param_set tail: decoder layers in θ_S"})
    include_lm_head: bool = field(default=True, metadata={"help": "param_set tail: the output projection in θ_S"})
    lora_r: int = field(default=8, metadata={"help": "param_set lora: adapter rank (STL: 8)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "param_set lora: adapter alpha (STL: 32)"})
    lora_seed: int = field(default=0, metadata={"help": "param_set lora: seed of the adapters' A matrices"})
    lr: float = field(default=1e-4, metadata={"help": "η of the forecast SGD step (STL's learning rate)"})
    max_length: int = field(default=1024, metadata={"help": "safety examples truncated to this many tokens, as in SFT"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message before every prompt"})
    candidate_chunk: int = field(default=32, metadata={"help": "candidate prompts per feature pass"})
    safety_chunk: int = field(default=8, metadata={"help": "safety examples per feature pass (one resumable block)"})
    top: int = field(default=5, metadata={"help": "contributing safety examples listed per prompt"})

    def __post_init__(self) -> None:
        if self.param_set not in PARAM_SETS:
            raise ValueError(f"param_set: expected one of {sorted(PARAM_SETS)}, got {self.param_set!r}")
        for name in ("lora_r", "max_length", "candidate_chunk", "safety_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.tail_layers, bool) or not isinstance(self.tail_layers, int) or self.tail_layers < 0:
            raise ValueError(f"tail_layers: expected a non-negative integer, got {self.tail_layers!r}")
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 0:
            raise ValueError(f"top: expected a non-negative integer, got {self.top!r}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")

    @property
    def param_options(self) -> ParamSetOptions:
        return ParamSetOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ParamSetOptions)})

    def numbers(self) -> dict:
        """The fields the gradient products depend on (a resumed run must match them): not η,
        which only scales, nor the chunking of candidates or the listing."""
        skip = {"lr", "candidate_chunk", "top"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
