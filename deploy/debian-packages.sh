#!/usr/bin/env bash
# Install the Debian packages fpe-node's tests and demo use, when missing (needs root).
# Usage: debian-packages.sh [PACKAGE...]   (default: everything the test suite needs)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=("$@")
if [ ${#pkgs[@]} -eq 0 ]; then
  pkgs=(dcmtk dicom3tools orthanc orthanc-dicomweb libpixelmed-java default-jre-headless postgresql chromium prometheus)
fi
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run as root: apt-get install ${missing[*]})" >&2
  exit 1
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
