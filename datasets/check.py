"""Report what is missing in a benchmark tree, before a long run finds out.

    python datasets/check.py hpatches data/hpatches         # also hpatches_dense
    python datasets/check.py scannet data/scannet
    python datasets/check.py yfcc data/yfcc100m_test
    python datasets/check.py megadepth1500 data/megadepth
    python datasets/check.py megadepth_8_scenes data/megadepth
    python datasets/check.py megadepth_dense data/megadepth  # dense benchmark on the training tree
    python datasets/check.py megadepth data/megadepth      # training tree (prep_scene_info)
    python datasets/check.py scannet_train data/scannet     # training tree (scannet_indices)

Exit status 0 when complete, 1 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys


def check_benchmark(name: str, root: str) -> list[str]:
    from dkm.benchmarks.check import check_tree

    n, problems = check_tree(name, root)
    print(f"{name}: {n} pairs listed, {len(problems)} with missing or unreadable files")
    return problems


def check_training(kind: str, root: str) -> list[str]:
    from dkm.data.megadepth import build_megadepth
    from dkm.data.scannet import build_scannet

    try:
        ds = build_megadepth(root) if kind == "megadepth" else build_scannet(root)
    except (FileNotFoundError, KeyError, OSError, ValueError) as e:  # missing, unreadable or empty scene infos
        return [f"{type(e).__name__}: {e}"]
    problems = []
    for part in ds.datasets:
        for i in range(len(part)):
            try:
                part[i]
            except Exception as e:  # anything training on the pair would trip over
                problems.append(f"{type(e).__name__}: {e}")
    print(f"{kind}: {sum(len(d) for d in ds.datasets)} training pairs, {len(problems)} unreadable")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from dkm.benchmarks import BENCHMARKS

    p.add_argument("name", choices=[*sorted(BENCHMARKS), "megadepth", "scannet_train"])
    p.add_argument("root")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if a.name in ("megadepth", "scannet_train"):
        problems = check_training("megadepth" if a.name == "megadepth" else "scannet", a.root)
    else:
        problems = check_benchmark(a.name, a.root)
    from dkm.benchmarks.check import report

    return report(problems)


if __name__ == "__main__":
    sys.exit(main())
