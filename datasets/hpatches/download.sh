#!/usr/bin/env bash
# Download the HPatches sequences into <root> (default data/hpatches) and unpack them there.
set -euo pipefail
root="${1:-data/hpatches}"
url="http://icvl.ee.ic.ac.uk/vbalnt/hpatches/hpatches-sequences-release.tar.gz"
mkdir -p "$root"
archive="$root/hpatches-sequences-release.tar.gz"
if [ ! -d "$root/hpatches-sequences-release" ]; then
  curl -L --fail -o "$archive" "$url"
  tar -xzf "$archive" -C "$root"
  rm -f "$archive"
fi
python "$(dirname "$0")/../check.py" hpatches "$root"
