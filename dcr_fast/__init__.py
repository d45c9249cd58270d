"""dcr-fast: fast Circle loss, empirical NTK and the DCR over-refusal pipeline."""

from dcr_fast.circle_loss import CircleLoss, circle_loss

__version__ = "0.1.0"
__all__ = ["CircleLoss", "circle_loss", "__version__"]
