"""Training stages of the DCR pipeline: ``dcr`` (contrastive refinement) and ``sft`` (STL safety SFT)."""

from dcr_fast.train.dcr import DCRConfig, run_dcr
from dcr_fast.train.sft import SFTConfig, run_sft

__all__ = ["DCRConfig", "SFTConfig", "run_dcr", "run_sft"]
