#!/usr/bin/env bash
# The test command (README): installs what the tests need when run as root, builds every binary the
# end-to-end tests start, then runs all tests. Usage: bash tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use (mount/umount for the tmpfs test come with util-linux).
PACKAGES=(util-linux ca-certificates)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
fi

cargo build --locked --workspace --bins
# End-to-end tests start many processes each; two at a time keeps a 2-core machine responsive.
cargo test --locked --workspace -- --test-threads=2 "$@"
