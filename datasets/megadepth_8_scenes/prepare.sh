#!/usr/bin/env bash
# Assemble MegaDepth-8-Scenes (DKM's split) at <root> (default data/megadepth):
#   - the 16 pair files mega_8_scenes_<scene>_<band>.npz from the DKM repository's assets/, downloaded;
#   - the images: Undistorted_SfM/<scene>/images of scenes 0008 0019 0021 0024 0025 0032 0063 1589 from
#     your MegaDepth v1 copy (https://www.cs.cornell.edu/projects/megadepth/), already under <root>.
#   bash datasets/megadepth_8_scenes/prepare.sh data/megadepth
set -euo pipefail
root="${1:-data/megadepth}"
mkdir -p "$root"
base="https://raw.githubusercontent.com/Parskatt/DKM/main/assets"
for band in 0.1_0.3 0.3_0.5; do
  for scene in 0019 0025 0021 0008 0032 1589 0063 0024; do
    f="mega_8_scenes_${scene}_${band}.npz"
    [ -f "$root/$f" ] || curl -L --fail -o "$root/$f" "$base/$f"
  done
done
python -m dkm.benchmarks.check megadepth_8_scenes "$root"
