#!/bin/sh
# A database VM: LVM on the second disk, the same layout as the UML lab
# (test/lvm/guest/lvm-rig.ts) under the name dbvg, thin pool "pool" with 64 KiB blocks,
# thin LV pgdata (lvm-thin + thin-delta) and plain LV pgclassic (lvm-classic),
# ext4 mounted under /srv; PostgreSQL 15 installed (initdb on /srv/pgdata, replication to the
# standby: see README; not scripted yet).
set -eu
role="$1"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q lvm2 thin-provisioning-tools postgresql-15
# The first extra disk (lsblk lists the boot disk first); run-suite.sh uses the second.
disk=$(lsblk -dpno NAME,TYPE | awk '$2=="disk"{print $1}' | sed -n 2p)
if ! vgs dbvg >/dev/null 2>&1; then
  pvcreate -y "$disk"
  vgcreate dbvg "$disk"
  lvcreate -L 4G --chunksize 64k -Zn -T dbvg/pool
  lvcreate -V 2G -T dbvg/pool -n pgdata
  lvcreate -L 1G -n pgclassic dbvg
  for lv in pgdata pgclassic; do mkfs.ext4 -q /dev/dbvg/$lv; mkdir -p /srv/$lv; echo "/dev/dbvg/$lv /srv/$lv ext4 defaults 0 2" >> /etc/fstab; done
  mount -a
fi
echo "$role ready: volumes /dev/dbvg/pgdata (/srv/pgdata), /dev/dbvg/pgclassic (/srv/pgclassic)"
