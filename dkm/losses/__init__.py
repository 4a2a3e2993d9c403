from .dkm_loss import DKMLoss

__all__ = ["DKMLoss"]
