#!/bin/sh
# Node 20, build tools and the project built in /vagrant (shared by every VM).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q curl ca-certificates build-essential python3 e2fsprogs util-linux
if ! command -v node >/dev/null || ! node -v | grep -q '^v20'; then
  curl -fsSL https://deb.nodesource.com/setup_20.x | bash -
  apt-get install -y -q nodejs
fi
cd /vagrant && npm ci && npm run build
