"""The settings every training stage has."""

from __future__ import annotations

import dataclasses

LR_SCHEDULES = ("cosine", "linear", "constant")
SHARDINGS = ("ddp", "fsdp")  # how dcr_fast.train.parallel wraps the model across ranks


@dataclasses.dataclass
class TrainConfig:
    """The settings every stage has: what ``run_steps``, checkpoints and the saved model use.

    ``DCRConfig`` and ``SFTConfig`` extend it with their data and recipe fields, and restate
    the defaults their recipes choose differently (warmup, schedule, LoRA).
    """

    model: str = dataclasses.field(default="", metadata={"help": "base model: local directory or hub id"})
    out: str = dataclasses.field(default="", metadata={"help": "output directory (checkpoint, logs, adapter, model)"})
    system_prompt: str | None = dataclasses.field(default=None, metadata={"help": "system message before every prompt"})
    seed: int = 0
    epochs: float = 3.0
    lr: float = 1e-4
    warmup_ratio: float = dataclasses.field(default=0.0, metadata={"help": "fraction of the steps spent in linear warmup"})
    lr_schedule: str = dataclasses.field(default="constant", metadata={"help": "cosine, linear or constant after warmup"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: bool = dataclasses.field(default=False, metadata={"help": "LoRA adapters instead of full-parameter training"})
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    dtype: str = dataclasses.field(default="float32", metadata={"help": "weight dtype: float32, bfloat16, float16"})
    bf16_autocast: bool = dataclasses.field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)"})
    attn_implementation: str = dataclasses.field(default="auto", metadata={"help": "auto (flash-attn 2 if installed, else sdpa), sdpa, eager"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda (under torchrun: each rank's cuda:LOCAL_RANK)"})
    sharding: str = dataclasses.field(default="ddp", metadata={"help": "under torchrun: ddp (replicated model; LoRA, small models) or fsdp (parameters, gradients and optimizer state sharded; full-parameter training of large models)"})
    save_every: int = dataclasses.field(default=50, metadata={"help": "checkpoint every N optimizer steps (and at the end)"})
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "stop after N optimizer steps (schedule unchanged; resume later)"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an earlier run's outputs in OUT (without it or --resume, such a folder is refused)"})
    progress: bool = dataclasses.field(default=True, metadata={"help": "a progress bar over the optimizer steps"})

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs: expected > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: expected in [0, 1), got {self.warmup_ratio}")
        if self.resume and self.overwrite:
            raise ValueError("resume, overwrite: give one; --resume continues the run in OUT, --overwrite replaces it")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding: expected one of {SHARDINGS}, got {self.sharding!r}")
        if self.sharding == "fsdp" and self.lora:
            raise ValueError("sharding: fsdp is for full-parameter training; LoRA adapters are a few MB, "
                             "use ddp (or --no-lora)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected cosine, linear or constant, got {self.lr_schedule!r}")

