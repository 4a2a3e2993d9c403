#!/usr/bin/env bash
# Arrange ScanNet-1500 (SuperGlue's split as LoFTR distributes it) at <root> (default data/scannet).
# ScanNet's licence forbids automatic downloads of its images: accept it, get LoFTR's "scannet_test_1500"
# archive (LoFTR's Google Drive test-data folder), extract it, then:
#   bash datasets/scannet1500/prepare.sh data/scannet /path/to/scannet_test_1500 [/path/to/test.npz]
# The scene folders (scene0707_00, ...) are found wherever they are in the given directory and linked
# as <root>/scans_test. The pair list test.npz is copied from the third argument or, without one,
# downloaded from LoFTR's repository (assets/scannet_test_1500/test.npz) and checked against SHA256SUMS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib.sh"
root="${1:-data/scannet}"
scenes="${2:?second argument: the extracted scannet_test_1500 directory}"
npz="${3:-}"
[ -d "$scenes" ] || { echo "no such directory: $scenes (expected the extracted scannet_test_1500 archive)" >&2; exit 1; }
mkdir -p "$root"
first="$(find "$scenes" -maxdepth 3 -type d -name 'scene0707_00' | head -n 1)"
[ -n "$first" ] || { echo "no scene0707_00/ under $scenes" >&2; exit 1; }
parent="$(cd "$(dirname "$first")" && pwd)"
[ -e "$root/scans_test" ] || ln -s "$parent" "$root/scans_test"
if [ -n "$npz" ]; then
  [ -f "$npz" ] || { echo "no such file: $npz" >&2; exit 1; }
  [ "$npz" -ef "$root/test.npz" ] || cp "$npz" "$root/test.npz"
else
  fetch "https://raw.githubusercontent.com/zju3dv/LoFTR/master/assets/scannet_test_1500/test.npz" \
    "$root/test.npz" "$(sha256_of test.npz "$here/SHA256SUMS")"
fi
python -m dkm.benchmarks.check scannet "$root"
