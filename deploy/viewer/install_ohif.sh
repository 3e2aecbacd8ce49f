#!/usr/bin/env bash
# Install the prebuilt OHIF viewer (npm package @ohif/app, its dist/ is a static site) into a
# cache folder, once. Usage: install_ohif.sh [DEST]   (default: .cache/ohif-<version> in the repo)
# The viewer is a test and demo tool: fpe-node itself never needs it.
set -euo pipefail
version="${OHIF_VERSION:-3.13.2}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${1:-$repo/.cache/ohif-$version}"
if [ -f "$dest/dist/index.html" ]; then
  echo "$dest/dist"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@ohif/app@$version" >/dev/null)
mkdir -p "$dest"
tar xzf "$tmp"/ohif-app-"$version".tgz -C "$tmp"
rm -rf "$dest/dist"
mv "$tmp/package/dist" "$dest/dist"
echo "$dest/dist"
