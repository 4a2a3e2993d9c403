#!/usr/bin/env bash
# Arrange ScanNet-1500 (SuperGlue's split as LoFTR distributes it) at <root> (default data/scannet).
# ScanNet's licence forbids automatic downloads: accept it, get LoFTR's "scannet_test_1500" archive and
# its test.npz (LoFTR's test-data folder / assets), then:
#   bash datasets/scannet1500/prepare.sh data/scannet /path/to/scannet_test_1500 /path/to/test.npz
# The scene folders (scene0707_00, ...) are found wherever they are in the given directory and linked
# as <root>/scans_test; test.npz is copied to <root>/test.npz.
set -euo pipefail
root="${1:-data/scannet}"
scenes="${2:?second argument: the extracted scannet_test_1500 directory}"
npz="${3:-}"
mkdir -p "$root"
first="$(find "$scenes" -maxdepth 3 -type d -name 'scene0707_00' | head -n 1)"
[ -n "$first" ] || { echo "no scene0707_00/ under $scenes" >&2; exit 1; }
parent="$(cd "$(dirname "$first")" && pwd)"
[ -e "$root/scans_test" ] || ln -s "$parent" "$root/scans_test"
if [ -n "$npz" ]; then cp "$npz" "$root/test.npz"; fi
python -m dkm.benchmarks.check scannet "$root"
