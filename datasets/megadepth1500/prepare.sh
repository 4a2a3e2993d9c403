#!/usr/bin/env bash
# Assemble MegaDepth-1500 (LoFTR's test split) at <root> (default data/megadepth):
#   - the five scene-info files from LoFTR's repository (assets/megadepth_test_1500_scene_info/), downloaded
#     and checked against SHA256SUMS;
#   - the images: either your copy of D2-Net's undistorted MegaDepth (Undistorted_SfM/0015, 0022 already
#     under <root>), or LoFTR's "megadepth_test_1500" archive from its Google Drive test-data folder (no
#     direct link: download it by hand), given as the second argument.
#   bash datasets/megadepth1500/prepare.sh data/megadepth ~/Downloads/megadepth_test_1500.tar
# Safe to run again after an interruption: finished downloads are kept, partial ones resumed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib.sh"
root="${1:-data/megadepth}"
archive="${2:-}"
mkdir -p "$root"
base="https://raw.githubusercontent.com/zju3dv/LoFTR/master/assets/megadepth_test_1500_scene_info"
for f in 0015_0.1_0.3.npz 0015_0.3_0.5.npz 0022_0.1_0.3.npz 0022_0.3_0.5.npz 0022_0.5_0.7.npz; do
  fetch "$base/$f" "$root/$f" "$(sha256_of "$f" "$here/SHA256SUMS")"
done
if [ -n "$archive" ]; then
  [ -f "$archive" ] || { echo "no such archive: $archive" >&2; exit 1; }
  tmp="$root/.extract"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  tar -xf "$archive" -C "$tmp"
  found="$(find "$tmp" -type d -name Undistorted_SfM | head -n 1)"
  [ -n "$found" ] || { echo "no Undistorted_SfM/ inside $archive" >&2; rm -rf "$tmp"; exit 1; }
  mkdir -p "$root/Undistorted_SfM"
  for s in 0015 0022; do
    [ -d "$found/$s" ] || { echo "no Undistorted_SfM/$s/ inside $archive" >&2; rm -rf "$tmp"; exit 1; }
    [ -e "$root/Undistorted_SfM/$s" ] || mv "$found/$s" "$root/Undistorted_SfM/$s"
  done
  rm -rf "$tmp"
fi
python -m dkm.benchmarks.check megadepth1500 "$root"
