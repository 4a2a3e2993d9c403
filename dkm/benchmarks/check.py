"""Report what is missing in a benchmark tree before a long run finds out.

    python -m dkm.benchmarks.check hpatches data/hpatches
    python -m dkm.benchmarks.check hpatches_dense data/hpatches
    python -m dkm.benchmarks.check scannet data/scannet
    python -m dkm.benchmarks.check yfcc data/yfcc100m_test
    python -m dkm.benchmarks.check megadepth1500 data/megadepth
    python -m dkm.benchmarks.check megadepth_8_scenes data/megadepth
    python -m dkm.benchmarks.check megadepth_dense data/megadepth

Lists the missing index files first (the benchmark refuses to start without them), then reads every
pair's images (and per-pair ground truth such as HPatches' homographies) and lists what is missing or
unreadable. Exit status 0 when complete, 1 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import BENCHMARKS

log = logging.getLogger(__name__)


def check_tree(name: str, root, open_images: bool = True) -> tuple[int, list[str]]:
    """``(number of pairs listed, problems)`` of the benchmark ``name`` at ``root``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    try:
        bench = BENCHMARKS[name](root)
    except FileNotFoundError as e:
        return 0, [line.strip() for line in str(e).splitlines()[1:] if line.strip() and not line.startswith("See")]
    except Exception as e:  # index files present but malformed (truncated npz or pickle, short lines, ...)
        return 0, [f"{type(e).__name__}: {e}"]
    problems = []
    for pair in bench.pairs() if open_images else ():
        try:
            bench.check_pair(pair)
        except FileNotFoundError as e:
            problems.append(f"{bench.pair_id(pair)}: {e.filename or e}")
        except Exception as e:  # anything evaluating the pair would trip over
            problems.append(f"{bench.pair_id(pair)}: {type(e).__name__}: {e}")
    for note in bench.completeness_warnings():
        log.warning(note)
    return len(bench), problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dkm.benchmarks.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("root")
    p.add_argument("--no-images", action="store_true", help="check the index files only")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    n, problems = check_tree(a.name, a.root, open_images=not a.no_images)
    print(f"{a.name} at {a.root}: {n} pairs listed, {len(problems)} problems")
    return report(problems)


def report(problems: list[str], most: int = 200) -> int:
    """Print the problems (at most ``most``) and a verdict; exit status 0 when there are none."""
    for line in problems[:most]:
        print("missing:", line)
    if len(problems) > most:
        print(f"... and {len(problems) - most} more")
    print("OK" if not problems else f"INCOMPLETE: {len(problems)} problems")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
