#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: the installable real data sets and the package.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q dataset-fashion-mnist gimp-data gimp-data-extras libtcmalloc-minimal4
fi
python3 -m pip install -q -e '.[test]'
