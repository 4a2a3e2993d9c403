"""DKM: Deep Kernelized Dense Geometric Matching (Edstedt, Wadenbäck, Felsberg, 2022), and DKMv3."""
from .models import DKMv3_indoor, DKMv3_outdoor, RegressionMatcher, build_model, dkm_base, dkm_small, load_weights

__all__ = ["DKMv3_indoor", "DKMv3_outdoor", "RegressionMatcher", "build_model", "dkm_base", "dkm_small",
           "load_weights"]
__version__ = "0.1.0"
