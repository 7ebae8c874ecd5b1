/**
 * LVM benchmark in user-mode-linux guests (scripts/lab/uml-guest.ts):
 * - incrementals after 2 000 pgbench transactions (scripts/lab/guest-pg-lab.ts:
 *   primary on a thin LV with thin-delta, streaming standby on a plain LV
 *   under dm-era, the agents in the guest, the appliance in this process),
 *   `--rounds` times: an audited incremental of each (a full digest
 *   compare: bytes read, wall time; the tracker's marked chunks against the
 *   really changed ones), then 2 000 more transactions and a tracker
 *   incremental of each (bytes read, wall time); every job's freeze window;
 * - the suspend window of a snapshot: wall time of `lvcreate -s` of a
 *   mounted, busy LV, classic (CoW) vs thin, N runs each;
 * - the cost of one thin_delta call (reserve_metadata_snap + thin_delta -m
 *   + release) as the pool's mapped data grows.
 * The guest is one slow CPU behind ptrace: compare the numbers with each
 * other (ratios), not with a real machine. Not part of `npm run bench`.
 *
 * - (--only stall, helper lvm-trust) the freeze window as an application sees it: the longest
 *   O_DSYNC write of a writer (one 4 KiB write every ~10 ms) overlapping each snapshot of the real
 *   provider, classic and thin, `--jobs` each (scripts/lab/write-stall.ts).
 *   npx tsx scripts/bench-lvm.ts [--runs 5] [--rounds 3] [--pg-conf 'wal_init_zero = off'] [--initdb-args --wal-segsize=1] [--only incrementals|micro|stall] [--jobs 12]
 */
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startAppliance } from './lab/appliance-harness.js';
import { GuestPgLab, PRIMARY, STANDBY } from './lab/guest-pg-lab.js';
import { repoRoot } from './lab/processes.js';
import { runInGuest } from './lab/uml-guest.js';
import { umlUnavailable } from './lab/uml-kit.js';

const arg = (name: string) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1] : undefined);
const runs = Number(arg('--runs') || 5);
const rounds = Number(arg('--rounds') || 3);
// postgresql.conf lines separated by ';' (e.g. 'wal_init_zero = off; wal_recycle = off'); initdb arguments (e.g. --wal-segsize=1).
const pgConf = (arg('--pg-conf') ?? '').split(';').map((l) => l.trim()).filter(Boolean);
const initdbArgs = (arg('--initdb-args') ?? '').split(/\s+/).filter(Boolean);
const only = arg('--only');

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

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)] ?? NaN;
const pct = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil(q * xs.length) - 1)] ?? NaN;

/** Incrementals of the guest's primary (thin-delta) and standby (dm-era); see the file comment. */
async function incrementals(): Promise<void> {
  const appl = await startAppliance(['db1', 'db2'], { auditEvery: 0 });
  let lab: GuestPgLab | null = null;
  type Row = { marked: number; changed: number; auditBytes: number; auditSeconds: number; trackerBytes: number; trackerSent: number; trackerChunksRead: number; trackerChunksSent: number; trackerSeconds: number; freeze: number[] };
  const rows: Record<string, Row[]> = { 'thin-delta': [], 'dm-era': [] };
  const job = async (who: { agent: string; volume: string }, mode: 'full' | 'incremental', audit = false) => {
    const t0 = performance.now();
    const j = appl.app.router.startJob(who.agent, who.volume, mode, audit ? { audit: true } : {});
    const r = await j.done;
    if (!r.ok) throw new Error(`${who.agent} ${mode}: ${JSON.stringify(r)}\n${await lab!.agentLogs()}`);
    return { s: appl.app.catalog.job(j.id)!.stats as Record<string, number | string>, seconds: (performance.now() - t0) / 1000 };
  };
  try {
    lab = await GuestPgLab.start({ appliance: appl, pgConf, initdbArgs });
    const up = (a: string) => appl.app.router.connectedAgents().some((x) => x.agent === a);
    await lab.connected(() => up('db1') && up('db2'));
    for (const who of [PRIMARY, STANDBY]) await job(who, 'full');
    for (let round = 0; round < rounds; round++) {
      await lab.step('pgbench', '2000');
      const audits = [];
      for (const who of [PRIMARY, STANDBY]) audits.push(await job(who, 'incremental', true));
      await lab.step('pgbench', '2000');
      for (const [i, who] of [PRIMARY, STANDBY].entries()) {
        const a = audits[i]!;
        const t = await job(who, 'incremental');
        if (a.s.auditMissed !== 0 || t.s.changeSource !== 'tracker') throw new Error(`round ${round} ${who.agent}: ${JSON.stringify({ audit: a.s, tracker: t.s })}`);
        const row = {
          marked: Number(a.s.trackedChunks), changed: Number(a.s.auditChanged), auditBytes: Number(a.s.bytesRead), auditSeconds: a.seconds,
          trackerBytes: Number(t.s.bytesRead), trackerSeconds: t.seconds, freeze: [Number(a.s.freezeSeconds), Number(t.s.freezeSeconds)],
          // Marked chunks are read; those whose digest equals the basis's (e.g. WAL zero-fill over zeros) are not sent.
          trackerSent: Number(t.s.bytesSent), trackerChunksRead: Number(t.s.chunksRead), trackerChunksSent: Number(t.s.chunksSent),
        };
        rows[who === PRIMARY ? 'thin-delta' : 'dm-era']!.push(row);
        console.log(`round ${round + 1} ${who === PRIMARY ? 'thin-delta' : 'dm-era'}: ${JSON.stringify(row)}`);
      }
    }
  } finally {
    await lab?.stop();
    await appl.close();
  }
  const MiB = (b: number) => (b / 1048576).toFixed(1);
  console.log(`\nincrementals after 2 000 pgbench transactions, medians of ${rounds}${pgConf.length ? ` (PostgreSQL: ${pgConf.join(', ')})` : ''}${initdbArgs.length ? ` (initdb ${initdbArgs.join(' ')})` : ''}:`);
  console.log('| tracker | marked / really changed chunks | tracker incremental: read, wall | tracker incremental: chunks read / sent, MiB sent | digest compare (audit): read, wall | wall digest / tracker | freeze p99 (max of all jobs) |');
  console.log('|---|---|---|---|---|---|---|');
  for (const [k, r] of Object.entries(rows)) {
    const ratio = median(r.map((x) => x.marked / x.changed));
    const tw = median(r.map((x) => x.trackerSeconds));
    const aw = median(r.map((x) => x.auditSeconds));
    const fr = r.flatMap((x) => x.freeze);
    console.log(`| ${k} | ${median(r.map((x) => x.marked))} / ${median(r.map((x) => x.changed))} = ${ratio.toFixed(2)} | ${MiB(median(r.map((x) => x.trackerBytes)))} MiB, ${tw.toFixed(1)} s | ` +
      `${median(r.map((x) => x.trackerChunksRead))} / ${median(r.map((x) => x.trackerChunksSent))}, ${MiB(median(r.map((x) => x.trackerSent)))} MiB | ` +
      `${MiB(median(r.map((x) => x.auditBytes)))} MiB, ${aw.toFixed(1)} s | ${(aw / tw).toFixed(2)} | ${pct(fr, 0.99).toFixed(2)} s (${k === 'thin-delta' ? 'thin: lvcreate' : 'classic: fsfreeze + lvcreate'}) |`);
  }
}

async function micro(): Promise<void> {
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
}

const why = await umlUnavailable();
if (why) {
  console.log(`bench-lvm skipped: ${why}`);
  process.exit(0);
}

/** --only stall: the write stall an application sees while the provider snapshots (scripts/lab/write-stall.ts). */
async function stall(): Promise<void> {
  const jobs = Number(arg('--jobs') || 12);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-bench-stall-'));
  try {
    const disk = path.join(dir, 'disk.img');
    await writeFile(disk, '');
    await truncate(disk, 1024 * 1024 * 1024);
    const vol = (mode: string, name: string) => `'${JSON.stringify({ mode, name, device: `/dev/b/${name}`, mountpoint: `/mnt/${name}` })}'`;
    const r = await runInGuest({
      disks: [{ file: disk }], timeoutMs: 1_200_000, script: `set -e
pvcreate -q -ff -y /dev/ubda >/dev/null; vgcreate -q b /dev/ubda >/dev/null
lvcreate -q -L 400M --chunksize 64k -Zn -T b/pool >/dev/null 2>&1
lvcreate -q -V 256M -T b/pool -n thin >/dev/null 2>&1
lvcreate -q -L 256M -n plain b >/dev/null 2>&1
for v in thin plain; do mkfs.ext4 -q -E nodiscard /dev/b/$v; mkdir -p /mnt/$v; mount /dev/b/$v /mnt/$v; done
node ${path.join(repoRoot(), 'dist', 'scripts', 'lab', 'write-stall.js')} bench --jobs ${jobs} ${vol('classic', 'plain')} ${vol('thin', 'thin')}
` });
    if (r.code !== 0) throw new Error(`guest failed (${r.code}): ${r.output}\n${r.console.slice(-1500)}`);
    const q = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil(p * xs.length) - 1)] ?? NaN;
    const f = (xs: number[]) => `${q(xs, 0.5)} / ${q(xs, 0.99)} / ${Math.max(...xs)}`;
    console.log(`write stall seen by an O_DSYNC writer (4 KiB every ~10 ms) during each snapshot, ${jobs} jobs per provider, ms p50 / p99 / max:`);
    console.log('| provider | longest write during create | same, equal windows without a snapshot | provider freezeSeconds | create() wall |');
    console.log('|---|---|---|---|---|');
    for (const line of r.output.split('\n').filter((l) => l.startsWith('{"volume"'))) {
      const x = JSON.parse(line) as { mode: string; stallMs: number[]; idleStallMs: number[]; freezeMs: number[]; createMs: number[]; writes: number };
      console.log(`| lvm-${x.mode} | ${f(x.stallMs)} | ${f(x.idleStallMs)} | ${f(x.freezeMs)} | ${f(x.createMs)} |`);
      console.log(`  raw ${x.mode}: ${JSON.stringify(x)}`);
    }
    console.log(`guest wall time ${r.seconds.toFixed(1)} s`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

if (only !== 'micro' && only !== 'stall') await incrementals();
if (only !== 'incrementals' && only !== 'stall') await micro();
if (!only || only === 'stall') await stall();
