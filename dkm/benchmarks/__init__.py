"""Benchmarks: one code path (pairs -> records -> metrics) used by evaluate.py, Python and callbacks."""
from .base import PairBenchmark, dedup_records
from .hpatches import HpatchesHomogBenchmark, HpatchesSequences
from .hpatches_dense import HpatchesDenseBenchmark
from .megadepth1500 import Megadepth1500Benchmark, Megadepth8ScenesBenchmark
from .megadepth_dense import MegadepthDenseBenchmark
from .relative_pose import RelativePoseBenchmark
from .scannet import ScanNetBenchmark
from .yfcc import Yfcc100mBenchmark

BENCHMARKS = {
    "hpatches": HpatchesHomogBenchmark,
    "hpatches_dense": HpatchesDenseBenchmark,
    "scannet": ScanNetBenchmark,
    "yfcc": Yfcc100mBenchmark,
    "megadepth1500": Megadepth1500Benchmark,
    "megadepth_8_scenes": Megadepth8ScenesBenchmark,
    "megadepth_dense": MegadepthDenseBenchmark,
}

__all__ = ["BENCHMARKS", "HpatchesDenseBenchmark", "HpatchesHomogBenchmark", "HpatchesSequences", "Megadepth1500Benchmark", "Megadepth8ScenesBenchmark",
           "MegadepthDenseBenchmark", "PairBenchmark", "RelativePoseBenchmark", "ScanNetBenchmark", "Yfcc100mBenchmark", "dedup_records"]
