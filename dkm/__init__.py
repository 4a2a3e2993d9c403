"""DKM: Deep Kernelized Dense Geometric Matching (Edstedt, Wadenbäck, Felsberg, 2022)."""
from .models import RegressionMatcher, build_model, dkm_base, dkm_small, load_weights

__all__ = ["RegressionMatcher", "build_model", "dkm_base", "dkm_small", "load_weights"]
__version__ = "0.1.0"
