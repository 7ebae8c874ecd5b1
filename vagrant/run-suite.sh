#!/bin/sh
# Inside a database VM: the same guest suites the UML lab runs (test/lvm/guest/),
# on the VM's real LVM. They create and remove their own volume group bsnvg on
# BSN_LVM_DISK, which must be an EMPTY spare disk (everything on it is lost) and
# not the disk provision-db.sh used. Never run by the project so far.
set -eu
: "${BSN_LVM_DISK:?set BSN_LVM_DISK to an empty spare disk, e.g. /dev/vdc}"
export BSN_LVM_DISK
cd /vagrant
exec node node_modules/vitest/vitest.mjs run --config test/lvm/vitest.guest.config.ts "$@"
