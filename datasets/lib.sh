# Shell functions shared by the download scripts (sourced, not run).

# fetch URL DEST [SHA256]: download URL to DEST.part (resuming a previous partial download) and rename
# it to DEST only when complete and, if SHA256 is given, when its checksum matches. An existing DEST is
# kept, so an interrupted script can simply be run again.
fetch() {
  local url="$1" dest="$2" sha="${3:-}"
  [ -f "$dest" ] && return 0
  local rc=0
  curl -L --fail --retry 3 -C - -o "$dest.part" "$url" || rc=$?
  if [ "$rc" = 33 ]; then  # the server does not resume: start over
    rm -f "$dest.part"
    rc=0
    curl -L --fail --retry 3 -o "$dest.part" "$url" || rc=$?
  fi
  if [ "$rc" != 0 ] && [ -s "$dest.part" ] && [ -n "$sha" ] && echo "$sha  $dest.part" | sha256sum --check --status; then
    rc=0  # already complete (the server refuses to resume past the end: HTTP 416)
  fi
  if [ "$rc" != 0 ]; then
    if [ -s "$dest.part" ]; then
      echo "download failed: $url (partial file kept as $dest.part: run the script again to resume," \
           "or delete it to start over)" >&2
    else
      rm -f "$dest.part"
      echo "download failed: $url" >&2
    fi
    return 1
  fi
  if [ -n "$sha" ] && ! echo "$sha  $dest.part" | sha256sum --check --status; then
    echo "checksum mismatch for $url (expected sha256 $sha); removed $dest.part, run the script again" >&2
    rm -f "$dest.part"
    return 1
  fi
  mv "$dest.part" "$dest"
}

# sha256_of NAME SUMS_FILE: the checksum listed for file NAME in a sha256sum-style SUMS_FILE.
sha256_of() {
  awk -v n="$1" '$2 == n { print $1 }' "$2"
}
