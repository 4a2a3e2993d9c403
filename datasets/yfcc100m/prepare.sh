#!/usr/bin/env bash
# Assemble the YFCC100M test tree the yfcc benchmark reads, at <root> (default data/yfcc100m_test):
#   1. OANet's "raw_data" archive (nine parts raw_data.tar.000 .. .008 on research.altizure.com, the
#      host OANet's README points to) holds yfcc100m/<scene>/test/ and pairs/<scene>-te-1000-pairs.pkl;
#   2. SuperGlue's assets/yfcc_test_pairs_with_gt.txt (one line per pair, rotation flags in columns 3-4).
# If you already have OANet's raw_data, pass it as the second argument: nothing is downloaded for it and
# <root> gets symbolic links to its yfcc100m/ and pairs/ (your copy is left as it is):
#   bash datasets/yfcc100m/prepare.sh data/yfcc100m_test /path/to/raw_data
# Safe to run again after an interruption: finished parts are kept (in <root>/.download), a partial one
# is resumed, and yfcc100m/ and pairs/ appear under <root> only once the archive is fully unpacked.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib.sh"
root="${1:-data/yfcc100m_test}"
raw="${2:-}"
mkdir -p "$root"
downloaded=0
if [ -z "$raw" ] && [ ! -d "$root/yfcc100m" ]; then
  downloaded=1
  tmp="$root/.download"
  mkdir -p "$tmp"
  for i in 000 001 002 003 004 005 006 007 008; do
    fetch "http://research.altizure.com/data/oanet_data/raw_data.tar.$i" "$tmp/raw_data.tar.$i"
  done
  rm -rf "$tmp/raw_data"
  cat "$tmp"/raw_data.tar.0* | tar -xzf - -C "$tmp"
  raw="$tmp/raw_data"
fi
if [ -n "$raw" ]; then
  for d in yfcc100m pairs; do
    [ -e "$root/$d" ] || [ -d "$raw/$d" ] || { echo "no $d/ in $raw (expected OANet's raw_data)" >&2; exit 1; }
  done
  for d in yfcc100m pairs; do
    [ -e "$root/$d" ] && continue
    if [ "$downloaded" = 1 ]; then
      mv "$raw/$d" "$root/$d"  # our own download: moved out of the temporary folder
    else
      ln -s "$(cd "$raw/$d" && pwd)" "$root/$d"  # the user's copy: linked, never moved
    fi
  done
fi
rm -rf "$root/.download"
fetch "https://raw.githubusercontent.com/magicleap/SuperGluePretrainedNetwork/master/assets/yfcc_test_pairs_with_gt.txt" \
  "$root/yfcc_test_pairs_with_gt.txt"
python -m dkm.benchmarks.check yfcc "$root"
