from .matcher import RegressionMatcher
from .zoo import DKMv3_indoor, DKMv3_outdoor, build_dkm, build_model, dkm_base, dkm_small, load_weights

__all__ = ["DKMv3_indoor", "DKMv3_outdoor", "RegressionMatcher", "build_dkm", "build_model", "dkm_base",
           "dkm_small", "load_weights"]
