from .matcher import RegressionMatcher
from .zoo import build_dkm, build_model, dkm_base, dkm_small, load_weights

__all__ = ["RegressionMatcher", "build_dkm", "build_model", "dkm_base", "dkm_small", "load_weights"]
