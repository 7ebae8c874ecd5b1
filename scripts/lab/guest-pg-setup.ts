/**
 * The shell (sh) that builds the LVM PostgreSQL lab inside a user-mode-linux
 * guest on /dev/ubda, shared by scripts/lab/guest-pg-lab.ts (e2e, bench) and
 * scripts/lab/lvm-marks-probe.ts:
 *
 * - a PostgreSQL 15 primary on a thin LV (bsnvg/pgdata, 256 MiB by default,
 *   pool bsnvg/pool with 64 KiB blocks and no zeroing) at /srv/pgdata/pg,
 *   port 5432;
 * - its streaming standby on a plain LV (bsnvg/stdata, the same size) under a
 *   dm-era target (/dev/mapper/stera, 64 KiB era blocks, metadata on
 *   bsnvg/stmeta) at /srv/standby/pg, port 5433; pgbench scale 2 loaded (by
 *   default).
 * Every whole-volume read in the guest (a full image, an audit) costs time in
 * proportion to the LV size: the e2e uses smaller LVs and scale (see there).
 *
 * Runs with `set -e` and leaves `set +e` behind; `cd /` first (the run folder
 * is root-only: postgres cannot start in it). `$PGBIN` is set.
 */
export interface GuestPgSetupOptions {
  /** Extra postgresql.conf lines for the primary (the standby copies them with pg_basebackup). */
  pgConf?: string[];
  /** Extra initdb arguments, e.g. `--wal-segsize=1` (no quotes or spaces inside one argument). */
  initdbArgs?: string[];
  /** Size of each cluster's LV (default 256 MiB). */
  volumeMiB?: number;
  /** pgbench scale (default 2: 200 000 accounts). */
  pgbenchScale?: number;
}

export function guestPgSetup(o: GuestPgSetupOptions = {}): string {
  const conf = ['shared_buffers = 32MB', ...(o.pgConf ?? [])].join('\n');
  const size = o.volumeMiB ?? 256;
  return `PGBIN=/usr/lib/postgresql/15/bin
cd /
set -e
pvcreate -q -ff -y /dev/ubda; vgcreate -q bsnvg /dev/ubda
lvcreate -q -L 512M --chunksize 64k -Zn -T bsnvg/pool
lvcreate -q -V ${size}M -T bsnvg/pool -n pgdata
lvcreate -q -L ${size}M -n stdata bsnvg; lvcreate -q -L 4M -n stmeta bsnvg
dd if=/dev/zero of=/dev/bsnvg/stmeta bs=4k count=1 oflag=direct status=none
dmsetup create stera --table "0 $(blockdev --getsz /dev/bsnvg/stdata) era /dev/bsnvg/stmeta /dev/bsnvg/stdata 128"
dmsetup mknodes
# No lazy init: ext4lazyinit's background zeroing would show up as changed blocks.
for d in /dev/bsnvg/pgdata /dev/mapper/stera; do mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 $d; done
mkdir -p /srv/pgdata /srv/standby
mount -o noatime /dev/bsnvg/pgdata /srv/pgdata; mount -o noatime /dev/mapper/stera /srv/standby
mkdir -p /srv/pgdata/pg /srv/standby/pg; chown postgres:postgres /srv/pgdata/pg /srv/standby/pg; chmod 700 /srv/standby/pg
runuser -u postgres -- $PGBIN/initdb -D /srv/pgdata/pg -A trust ${(o.initdbArgs ?? []).join(' ')} >/dev/null
cat >> /srv/pgdata/pg/postgresql.conf <<'CONF'
${conf}
CONF
runuser -u postgres -- $PGBIN/pg_ctl -D /srv/pgdata/pg -l /tmp/pg1.log -o "-p 5432 -k /tmp -c listen_addresses=127.0.0.1" -w start >/dev/null
$PGBIN/pgbench -h 127.0.0.1 -U postgres -i -s ${o.pgbenchScale ?? 2} -q postgres 2>/dev/null
runuser -u postgres -- $PGBIN/pg_basebackup -h 127.0.0.1 -p 5432 -U postgres -D /srv/standby/pg -R -X stream -c fast -C -S bsn_standby
runuser -u postgres -- $PGBIN/pg_ctl -D /srv/standby/pg -l /tmp/pg2.log -o "-p 5433 -k /tmp -c listen_addresses=127.0.0.1" -w start >/dev/null
set +e
`;
}
