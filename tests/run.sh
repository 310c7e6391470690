#!/usr/bin/env bash
# The test command (README): installs what the tests need when run as root, builds every binary the
# end-to-end tests start, then runs all tests. Usage: bash tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: mount/umount (tmpfs test) from util-linux; a real registry, image
# tools, busybox, containerd and runc for the registry tests; htpasswd (apache2-utils) for registry auth;
# dockerd (docker.io) and podman as real registry clients; ip/tc (iproute2), aria2, opentracker and
# mktorrent for the namespaced cluster's smoke run (tests/bench/cluster.sh).
PACKAGES=(util-linux ca-certificates docker-registry apache2-utils skopeo umoci busybox-static containerd runc docker.io podman
  iproute2 aria2 opentracker mktorrent)
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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace -- --test-threads=2 "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one per binary, the last often for doc tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$rc"
