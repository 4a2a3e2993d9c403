#!/usr/bin/env bash
# Download the HPatches sequences into <root> (default data/hpatches) and unpack them there
# (<root>/hpatches-sequences-release/<seq>/{1..6}.ppm, H_1_2 .. H_1_6; 116 sequences).
# Safe to run again after an interruption: the download resumes, and the sequences appear under <root>
# only once the archive has been unpacked completely.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib.sh"
root="${1:-data/hpatches}"
url="http://icvl.ee.ic.ac.uk/vbalnt/hpatches/hpatches-sequences-release.tar.gz"
mkdir -p "$root"
archive="$root/hpatches-sequences-release.tar.gz"
if [ ! -d "$root/hpatches-sequences-release" ]; then
  fetch "$url" "$archive"
  tmp="$root/.extract"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  tar -xzf "$archive" -C "$tmp"
  [ -d "$tmp/hpatches-sequences-release" ] || { echo "no hpatches-sequences-release/ in $archive" >&2; exit 1; }
  mv "$tmp/hpatches-sequences-release" "$root/hpatches-sequences-release"
  rm -rf "$tmp" "$archive"
fi
python "$here/../check.py" hpatches "$root"
