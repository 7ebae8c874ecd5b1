/**
 * LVM micro-benchmark in a user-mode-linux guest (scripts/lab/uml-guest.ts):
 * - the suspend window of a snapshot: wall time of `lvcreate -s` of a
 *   mounted, busy LV, classic (CoW) vs thin, N runs each;
 * - the cost of one thin_delta call (reserve_metadata_snap + thin_delta -m
 *   + release) as the pool's mapped data grows.
 * The guest is one slow CPU behind ptrace: compare the numbers with each
 * other (ratios), not with a real machine. Not part of `npm run bench`.
 *
 *   node dist/scripts/bench-lvm.js [--runs 5]
 */
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { runInGuest } from './lab/uml-guest.js';
import { umlUnavailable } from './lab/uml-kit.js';

const runs = Number(process.argv[process.argv.indexOf('--runs') + 1] || 5);

const script = `set -e
ms() { date +%s%N; }
pvcreate -q -ff -y /dev/ubda >/dev/null; vgcreate -q b /dev/ubda >/dev/null
lvcreate -q -L 1500M --chunksize 64k -Zn -T b/pool >/dev/null 2>&1
lvcreate -q -V 1G -T b/pool -n thin >/dev/null 2>&1
lvcreate -q -L 256M -n plain b >/dev/null 2>&1
for v in thin plain; do mkfs.ext4 -q -E nodiscard /dev/b/$v; mkdir -p /mnt/$v; mount /dev/b/$v /mnt/$v; done
# a writer keeps both filesystems busy while snapshots are taken
( i=0; while :; do for v in thin plain; do dd if=/dev/zero of=/mnt/$v/busy bs=64k count=16 conv=fsync status=none; done; i=$((i+1)); done ) &
W=$!
for r in $(seq ${runs}); do
  for kind in thin classic; do
    if [ $kind = thin ]; then a=""; o=b/thin; else a="-L 64M"; o=b/plain; fi
    t0=$(ms); lvcreate -q -s $a -n s$kind$r $o >/dev/null 2>&1; t1=$(ms)
    echo "freeze $kind $(( (t1 - t0) / 1000000 ))"
    lvremove -q -f b/s$kind$r >/dev/null 2>&1
  done
done
kill $W; wait $W 2>/dev/null || true
lvcreate -q -s -n base b/thin >/dev/null 2>&1
BASE=$(lvs --noheadings -o thin_id b/base | tr -d ' '); ORIG=$(lvs --noheadings -o thin_id b/thin | tr -d ' ')
for mib in 0 64 256 512; do
  [ $mib -gt 0 ] && dd if=/dev/urandom of=/mnt/thin/grow$mib bs=1M count=$mib conv=fsync status=none
  dmsetup mknodes
  t0=$(ms)
  dmsetup message b-pool-tpool 0 reserve_metadata_snap
  n=$(thin_delta -m --snap1 $BASE --snap2 $ORIG /dev/mapper/b-pool_tmeta | grep -c -E '<(different|left_only|right_only)' || true)
  dmsetup message b-pool-tpool 0 release_metadata_snap
  t1=$(ms)
  echo "delta $mib $(( (t1 - t0) / 1000000 )) $n $(lvs --noheadings -o data_percent b/pool | tr -d ' ')"
done
`;

const why = await umlUnavailable();
if (why) {
  console.log(`bench-lvm skipped: ${why}`);
  process.exit(0);
}
const dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-bench-lvm-'));
try {
  const disk = path.join(dir, 'disk.img');
  await writeFile(disk, '');
  await truncate(disk, 2048 * 1024 * 1024);
  const r = await runInGuest({ disks: [{ file: disk }], script, timeoutMs: 900_000 });
  if (r.code !== 0) throw new Error(`guest failed (${r.code}): ${r.output}\n${r.console.slice(-1500)}`);
  const freeze: Record<string, number[]> = { thin: [], classic: [] };
  const delta: string[] = [];
  for (const line of r.output.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f[0] === 'freeze') freeze[f[1]!]!.push(Number(f[2]));
    if (f[0] === 'delta') delta.push(`| ${f[1]} MiB written since the basis | ${f[2]} ms | ${f[3]} ranges | pool ${f[4]} % |`);
  }
  const p = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))] ?? NaN;
  console.log(`lvcreate -s of a busy mounted LV (the suspend/freeze window), ${runs} runs, ms:`);
  for (const k of ['thin', 'classic']) console.log(`  ${k}: median ${p(freeze[k]!, 0.5)}, max ${Math.max(...freeze[k]!)}`);
  console.log(`  classic / thin (medians): ${(p(freeze.classic!, 0.5) / p(freeze.thin!, 0.5)).toFixed(2)}`);
  console.log('thin_delta call (reserve + thin_delta -m + release) as the pool fills:');
  for (const d of delta) console.log(d);
  console.log(`guest wall time ${r.seconds.toFixed(1)} s`);
} finally {
  await rm(dir, { recursive: true, force: true });
}
