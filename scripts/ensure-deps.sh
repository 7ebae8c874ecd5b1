#!/usr/bin/env bash
# Installs what blocksnap's demo, tests and benchmarks need on a fresh Debian
# machine (root required: loop devices, mounts, fsfreeze, tracefs), then
# installs npm dependencies (only when the lock file changed) and builds.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "blocksnap: run as root (it attaches loop devices, mounts and freezes filesystems)" >&2
  exit 1
fi

pkgs=()
command -v mkfs.xfs >/dev/null || pkgs+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || pkgs+=(e2fsprogs)
command -v losetup >/dev/null || pkgs+=(mount)
command -v fsfreeze >/dev/null || pkgs+=(util-linux)
command -v blkdiscard >/dev/null || pkgs+=(util-linux)
command -v cmp >/dev/null || pkgs+=(diffutils)
command -v nbdcopy >/dev/null || pkgs+=(libnbd-bin)   # nbdinfo, nbdcopy: real NBD clients in test/nbd
command -v fusermount3 >/dev/null || pkgs+=(fuse3)    # nbdfuse (libnbd-bin) mounts and fusermount3 -u unmounts
[ -f /usr/lib/python3/dist-packages/nbd.py ] || pkgs+=(python3-libnbd)   # libnbd's Python binding (test/nbd)
command -v nbdkit >/dev/null || pkgs+=(nbdkit)        # the reference server scripts/bench-nbd.ts compares with
command -v openssl >/dev/null || pkgs+=(openssl)
[ -x /usr/lib/postgresql/15/bin/postgres ] || pkgs+=(postgresql-15)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "blocksnap: installing ${pkgs[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

mountpoint -q /sys/kernel/tracing || mount -t tracefs none /sys/kernel/tracing 2>/dev/null || true

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ] \
   || ! node -e "require('better-sqlite3'); require('zstd-napi')" 2>/dev/null; then
  npm ci --no-audit --no-fund
  node scripts/seed-prebuilds.cjs   # the next npm ci reuses the addons compiled here (no GitHub downloads)
fi
npm run build --silent
