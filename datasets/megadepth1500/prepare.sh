#!/usr/bin/env bash
# Assemble MegaDepth-1500 (LoFTR's test split) at <root> (default data/megadepth):
#   - the five scene-info files from LoFTR's repository (assets/megadepth_test_1500_scene_info/), downloaded;
#   - the images: either your MegaDepth copy (Undistorted_SfM/0015, 0022 already under <root>), or
#     LoFTR's "megadepth_test_1500" archive from its Google Drive test-data folder (no direct link:
#     download it by hand), given as the second argument.
#   bash datasets/megadepth1500/prepare.sh data/megadepth ~/Downloads/megadepth_test_1500.tar
set -euo pipefail
root="${1:-data/megadepth}"
archive="${2:-}"
mkdir -p "$root"
base="https://raw.githubusercontent.com/zju3dv/LoFTR/master/assets/megadepth_test_1500_scene_info"
for f in 0015_0.1_0.3.npz 0015_0.3_0.5.npz 0022_0.1_0.3.npz 0022_0.3_0.5.npz 0022_0.5_0.7.npz; do
  [ -f "$root/$f" ] || curl -L --fail -o "$root/$f" "$base/$f"
done
if [ -n "$archive" ]; then
  tmp="$root/.extract"
  mkdir -p "$tmp"
  tar -xf "$archive" -C "$tmp"
  src="$(dirname "$(find "$tmp" -type d -name Undistorted_SfM | head -n 1)")"
  [ -n "$src" ] || { echo "no Undistorted_SfM/ inside $archive" >&2; exit 1; }
  mkdir -p "$root/Undistorted_SfM"
  for s in 0015 0022; do
    [ -e "$root/Undistorted_SfM/$s" ] || mv "$src/Undistorted_SfM/$s" "$root/Undistorted_SfM/$s"
  done
  rm -rf "$tmp"
fi
python -m dkm.benchmarks.check megadepth1500 "$root"
