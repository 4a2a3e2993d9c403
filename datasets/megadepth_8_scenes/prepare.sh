#!/usr/bin/env bash
# Assemble MegaDepth-8-Scenes (DKM's split) at <root> (default data/megadepth):
#   - the 16 pair files mega_8_scenes_<scene>_<band>.npz from the DKM repository's assets/, downloaded
#     and checked against SHA256SUMS;
#   - the images: Undistorted_SfM/<scene>/images of scenes 0008 0019 0021 0024 0025 0032 0063 1589 from
#     your copy of D2-Net's undistorted MegaDepth (see datasets/megadepth/README.md), already under <root>.
#   bash datasets/megadepth_8_scenes/prepare.sh data/megadepth
# Safe to run again after an interruption: finished downloads are kept, partial ones resumed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib.sh"
root="${1:-data/megadepth}"
mkdir -p "$root"
base="https://raw.githubusercontent.com/Parskatt/DKM/main/assets"
for band in 0.1_0.3 0.3_0.5; do
  for scene in 0019 0025 0021 0008 0032 1589 0063 0024; do
    f="mega_8_scenes_${scene}_${band}.npz"
    fetch "$base/$f" "$root/$f" "$(sha256_of "$f" "$here/SHA256SUMS")"
  done
done
python -m dkm.benchmarks.check megadepth_8_scenes "$root"
