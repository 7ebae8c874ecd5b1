/**
 * Restore benchmark (`node dist/scripts/bench-restore.js` after `npm run
 * build`; part of `npm run bench`; not a test). An in-process appliance, the
 * agent as a real process, `blocksnap-agent restore --json` as a user runs it.
 *
 *  1. Full restore MB/s of allocated data: a 1 GiB ext4 volume holding
 *     BENCH_RESTORE_MIB (768) MiB of random files, one full image, restored
 *     onto a new file and onto a loop device, BENCH_RUNS (3) runs each,
 *     medians; vs `dd bs=4M conv=fsync` of the raw snapshot file to a new
 *     file (the same bytes, no network, no checks).
 *  1b. `pgbench`: the same restores of the data the full backup's ≥ 500 MB/s
 *     was measured on (bench.ts part A, scripts/lab/pgbench-volume.ts):
 *     pgbench scale BENCH_PGBENCH_SCALE (50) on a 4 GiB volume, PostgreSQL
 *     running during the full backup; MB/s of allocated data, CPU per GiB,
 *     vs `dd` of the raw snapshot (a smaller scale for quick runs).
 *  2. Changed-only vs full after BENCH_TX (2 000) pgbench transactions
 *     (scale BENCH_SCALE, 10) on a PostgreSQL 15 volume: bytes and chunks
 *     written by `--changed-only` onto the volume (tracker) and by a full
 *     restore of the same image.
 *  3. `bitset` vs Uint32Array for the changed-only union over 16 Mi chunks
 *     (1 TiB at 64 KiB): a tracker bitmap with 1 % of the bits set ∪ a
 *     digest-diff set with 0.5 %, medians of 7.
 * BENCH_TARGET_DIR puts the file targets (restore and dd) elsewhere, e.g.
 * /dev/shm to measure without the disk. Writes .bench/restore.json.
 */
import { execa } from 'execa';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { digestDiffSet, setOfWords, unionOf } from '../agent/restore/changed-set.js';
import type { RestoreResult } from '../agent/restore/restore-run.js';
import { exitAfterFlush } from '../proto/shared/cli-exit.js';
import { startAppliance, type ApplianceHarness } from './lab/appliance-harness.js';
import { attachLoop, detachLoop } from './lab/loop.js';
import { PgCluster } from './lab/pg-cluster.js';
import { createPgbenchVolume, PGBENCH_VOLUME_SIZE } from './lab/pgbench-volume.js';
import { agentCli, spawnAgent, type Daemon } from './lab/processes.js';
import { createVolumeLab, type VolumeLab } from './lab/volume-lab.js';

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const DATA_MIB = Number(process.env.BENCH_RESTORE_MIB ?? 768);
const TX = Number(process.env.BENCH_TX ?? 2000);
const SCALE = Number(process.env.BENCH_SCALE ?? 10);
/** Where the file targets go (default: the lab's XFS pool); e.g. /dev/shm to take the disk out of the measurement. */
const TARGET_DIR = process.env.BENCH_TARGET_DIR;
/** BENCH_RESTORE_PARTS=full runs only part 1 (e.g. to compare variants or profile with NODE_OPTIONS=--cpu-prof). */
const PARTS = (process.env.BENCH_RESTORE_PARTS ?? 'bitset,full,pgbench,changed').split(',');
const PGBENCH_SCALE = Number(process.env.BENCH_PGBENCH_SCALE ?? 50);
const GiB = 1024 ** 3;
const MB = 1e6;

const say = (m: string) => process.stdout.write(m + '\n');
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Setup { lab: VolumeLab; appl: ApplianceHarness; agent: Daemon; configFile: string; kept: string }

async function setUp(name: string, appl: ApplianceHarness, lab: VolumeLab): Promise<Setup> {
  // The lab's volume name is the one backups and restores name (vol, or pgdata for the pgbench volume).
  const stateDir = join(lab.root, `state-${name}`);
  const kept = join(lab.poolMount, `kept-${name}`);
  await mkdir(stateDir, { recursive: true });
  await mkdir(kept, { recursive: true });
  const configFile = join(lab.root, `agent-${name}.json`);
  await writeFile(configFile, JSON.stringify({
    appliance: appl.url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes: [lab.volume], retainSnapshotsDir: kept,
  }));
  const logFile = join(lab.root, `agent-${name}.log`);
  const agent = spawnAgent(configFile, logFile);
  for (let i = 0; i < 600 && !appl.app.router.connectedAgents().some((a) => a.agent === 'db1') && agent.child.exitCode === null; i++) await sleep(100);
  if (!appl.app.router.connectedAgents().some((a) => a.agent === 'db1')) {
    await agent.stop().catch(() => undefined);
    throw new Error(`agent did not connect; its log:\n${(await readFile(logFile, 'utf8').catch(() => '')).slice(-2000)}`);
  }
  return { lab, appl, agent, configFile, kept };
}

async function backup(s: Setup, mode: 'full' | 'incremental'): Promise<{ imageId: string; snap: string }> {
  const job = s.appl.app.router.startJob('db1', s.lab.volume.name, mode);
  const outcome = await job.done;
  if (!outcome.ok) throw new Error(`backup failed: ${JSON.stringify(outcome)}`);
  return { imageId: outcome.imageId!, snap: join(s.kept, `${s.lab.volume.name}_${job.id}.img`) };
}

async function restoreCli(s: Setup, imageId: string, target: string, ...flags: string[]): Promise<RestoreResult> {
  const r = await execa(process.execPath, [agentCli(), 'restore', imageId, '--to', target, '--json', '--config', s.configFile, ...flags], { reject: false, stdin: 'ignore' });
  if (r.exitCode !== 0) throw new Error(`restore failed (${r.exitCode}): ${String(r.stderr)}`);
  return JSON.parse(String(r.stdout)) as RestoreResult;
}

async function fullRestoreBench(appl: ApplianceHarness): Promise<Record<string, unknown>> {
  const lab = await createVolumeLab({ volumeSize: GiB, poolSize: 8 * GiB, name: 'vol' });
  let s: Setup | null = null;
  try {
    s = await setUp('random', appl, lab);
    for (let i = 0; i * 128 < DATA_MIB; i++) {
      await execa('dd', ['if=/dev/urandom', `of=${join(s.lab.volumeMount, `r${i}`)}`, 'bs=1M', `count=${Math.min(128, DATA_MIB - i * 128)}`, 'status=none']);
    }
    await execa('sync');
    return await restoreRounds(s, 'restore', GiB);
  } finally {
    await s?.agent.stop();
    await lab.destroy();
  }
}

/**
 * The same restores of the data the full backup's goal was measured on
 * (bench.ts part A): pgbench on a 4 GiB volume, backed up while PostgreSQL
 * runs. Compressible (~17×): few bytes cross the socket; the agent's zstd
 * decompression, SHA-256 and writes are the work.
 */
async function pgbenchRestoreBench(appl: ApplianceHarness): Promise<Record<string, unknown>> {
  const v = await createPgbenchVolume(PGBENCH_SCALE, (m) => say(`pgbench restore: ${m}`));
  let s: Setup | null = null;
  try {
    s = await setUp('pgbench', appl, v.lab);
    return { scale: PGBENCH_SCALE, ...(await restoreRounds(s, `pgbench restore (scale ${PGBENCH_SCALE})`, PGBENCH_VOLUME_SIZE)) };
  } finally {
    await s?.agent.stop();
    await v.destroy();
  }
}

/**
 * One full image of the set-up's volume, then BENCH_RUNS rounds of: restore
 * onto a new file (BENCH_TARGET_DIR or the pool), onto a loop device of the
 * volume's size, and `dd` of the raw snapshot; medians, MB/s of allocated data.
 */
async function restoreRounds(s: Setup, label: string, volumeSize: number): Promise<Record<string, unknown>> {
  const img = await backup(s, 'full');
  const snapBytes = (await stat(img.snap)).blocks * 512;
  say(`${label}: image ${img.imageId}, ${(snapBytes / 2 ** 20).toFixed(0)} MiB allocated of ${volumeSize / 2 ** 20} MiB`);
  const devFile = join(s.lab.poolMount, 'target-dev.img');
  await writeFile(devFile, '');
  await execa('truncate', ['-s', String(volumeSize), devFile]);
  const dev = await attachLoop(devFile);
  // The snapshot read once before the rounds: the restore reads the appliance's store from the page cache
  // (it was just written), so dd gets its source warm too (cold, a pgbench snapshot read at ~33 MB/s here).
  await execa('dd', [`if=${img.snap}`, 'of=/dev/null', 'bs=4M', 'status=none']);
  const file: number[] = [];
  const device: number[] = [];
  const dd: number[] = [];
  const ddDev: number[] = [];
  const agentCpu: number[] = [];
  const applianceCpu: number[] = [];
  const split: { agent: ReturnType<typeof cpuSplit>; appliance: ReturnType<typeof cpuSplit> }[] = [];
  const loads: number[] = [loadavg()[0]!];
  try {
    for (let run = 0; run < RUNS; run++) {
      const out = join(TARGET_DIR ?? s.lab.poolMount, `restored-${run}.raw`);
      const cpuAgent0 = await cpuSeconds(s.agent.pid);
      const cpuAppl0 = process.cpuUsage();
      const thAgent0 = await threadCpu(s.agent.pid);
      const thAppl0 = await threadCpu(process.pid);
      const r = await restoreCli(s, img.imageId, out);
      const gib = r.bytesWritten / GiB;
      agentCpu.push((await cpuSeconds(s.agent.pid) - cpuAgent0) / gib);
      const cu = process.cpuUsage(cpuAppl0);
      applianceCpu.push((cu.user + cu.system) / 1e6 / gib);
      const sa = cpuSplit(s.agent.pid, thAgent0, await threadCpu(s.agent.pid), gib);
      const sp = cpuSplit(process.pid, thAppl0, await threadCpu(process.pid), gib);
      say(`  CPU s/GiB by thread: agent main ${sa.main.toFixed(2)}, restore workers (ended) ${sa.rest.toFixed(2)}, other threads ${sa.others.toFixed(2)}; ` +
        `appliance main ${sp.main.toFixed(2)}, other threads ${sp.others.toFixed(2)} (+${sp.rest.toFixed(2)} new/ended)`);
      split.push({ agent: sa, appliance: sp });
      file.push(r.mbPerSecond);
      await rm(out, { force: true });
      const rd = await restoreCli(s, img.imageId, dev);
      device.push(rd.bytesWritten / MB / rd.seconds);
      const ddOut = join(TARGET_DIR ?? s.lab.poolMount, `dd-${run}.raw`);
      const t0 = performance.now();
      await execa('dd', [`if=${img.snap}`, `of=${ddOut}`, 'bs=4M', 'conv=fsync,sparse', 'status=none']);
      dd.push(snapBytes / MB / ((performance.now() - t0) / 1000));
      await rm(ddOut, { force: true });
      // The same bytes onto the loop device (what its restore is up against: the device's page cache,
      // the loop, the pool's filesystem and disk; conv=sparse skips the holes as the restore does).
      const t1 = performance.now();
      await execa('dd', [`if=${img.snap}`, `of=${dev}`, 'bs=4M', 'conv=fsync,sparse', 'status=none']);
      ddDev.push(snapBytes / MB / ((performance.now() - t1) / 1000));
      loads.push(loadavg()[0]!);
      say(`  run ${run + 1}: restore to file ${r.mbPerSecond.toFixed(0)} MB/s (${r.chunksFetched} chunks, ${r.holes} holes, ${r.seconds.toFixed(2)} s; ` +
        `CPU per GiB: agent ${agentCpu[run]!.toFixed(2)} s, appliance ${applianceCpu[run]!.toFixed(2)} s), ` +
        `to loop device ${device[run]!.toFixed(0)} MB/s (${rd.seconds.toFixed(2)} s incl. zeroing ${(rd.bytesZeroed / 2 ** 20).toFixed(0)} MiB), dd ${dd[run]!.toFixed(0)} MB/s, dd to the loop device ${ddDev[run]!.toFixed(0)} MB/s; load ${loads[run + 1]!.toFixed(1)}`);
    }
  } finally {
    await detachLoop(dev, { backingFile: devFile }).catch(() => undefined);
    await rm(devFile, { force: true });
  }
  const res = {
    allocatedMiB: snapBytes / 2 ** 20, fileMBps: median(file), deviceMBps: median(device), ddMBps: median(dd), ddDeviceMBps: median(ddDev),
    agentCpuPerGiB: median(agentCpu), applianceCpuPerGiB: median(applianceCpu), loadavg: loadavg()[0], runs: { file, device, dd, ddDev, agentCpu, applianceCpu, split, loads },
  };
  say(`${label} MB/s of allocated data (median of ${RUNS}): file ${res.fileMBps.toFixed(0)}, loop device ${res.deviceMBps.toFixed(0)}, dd of the raw file ` +
    `${res.ddMBps.toFixed(0)}, dd to the loop device ${res.ddDeviceMBps.toFixed(0)}; CPU per GiB restored: agent ${res.agentCpuPerGiB.toFixed(2)} s, appliance ${res.applianceCpuPerGiB.toFixed(2)} s ` +
    `(each side on its own idle core could do ${(GiB / MB / Math.max(res.agentCpuPerGiB, res.applianceCpuPerGiB)).toFixed(0)} MB/s); ` +
    `load average ${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)}`);
  return res;
}

async function changedOnlyBench(appl: ApplianceHarness): Promise<Record<string, unknown>> {
  const lab = await createVolumeLab({ volumeSize: GiB, poolSize: 8 * GiB, name: 'vol' });
  const pg = new PgCluster({ dataDir: join(lab.volumeMount, 'pg') });
  let s: Setup | null = null;
  try {
    await pg.initdb();
    await pg.start();
    await pg.pgbenchInit(SCALE);
    await pg.query('checkpoint');
    s = await setUp('pg', appl, lab);
    const img = await backup(s, 'full');
    await pg.pgbench({ transactions: TX, clients: 2 });
    await pg.query('checkpoint');
    await pg.stop();
    await execa('umount', [lab.volumeMount]);
    let changed: RestoreResult;
    try {
      changed = await restoreCli(s, img.imageId, lab.volumeDevice, '--changed-only');
    } finally {
      await execa('mount', [lab.volumeDevice, lab.volumeMount]);
    }
    const out = join(lab.poolMount, 'full.raw');
    const full = await restoreCli(s, img.imageId, out);
    await rm(out, { force: true });
    const res = {
      transactions: TX, scale: SCALE,
      changedOnly: {
        source: changed.changeSource, compared: changed.chunksCompared, chunks: changed.chunksFetched + changed.holes,
        bytesWritten: changed.bytesWritten + changed.bytesZeroed, seconds: changed.seconds,
      },
      full: { chunks: full.chunksFetched, bytesWritten: full.bytesWritten, seconds: full.seconds },
    };
    say(`changed-only vs full after ${TX} pgbench transactions (scale ${SCALE}): changed-only (${changed.changeSource}, ${changed.chunksCompared} candidates read) wrote ${res.changedOnly.chunks} chunks ` +
      `${(res.changedOnly.bytesWritten / 2 ** 20).toFixed(1)} MiB in ${changed.seconds.toFixed(2)} s; full wrote ${full.chunksFetched} chunks ` +
      `${(full.bytesWritten / 2 ** 20).toFixed(1)} MiB in ${full.seconds.toFixed(2)} s (${(100 * res.changedOnly.bytesWritten / full.bytesWritten).toFixed(1)} %)`);
    return res;
  } finally {
    await s?.agent.stop();
    await pg.destroy().catch(() => undefined);
    await lab.destroy();
  }
}

/** The changed-only union at 1 TiB / 64 KiB: bitset (the chosen package) vs a plain Uint32Array OR. */
function bitsetBench(): Record<string, unknown> {
  const n = 16 * 1024 * 1024;
  const words = new Uint32Array(n / 32);
  for (let k = 0; k < n / 100; k++) {
    const i = Math.floor(Math.random() * n);
    words[i >>> 5]! |= 1 << (i & 31);
  }
  // The union's second operand as the tracker's words are: 0.5 % of the bits (the digest diff is timed separately below).
  const diffWords = new Uint32Array(n / 32);
  for (let k = 0; k < n / 200; k++) {
    const i = Math.floor(Math.random() * n);
    diffWords[i >>> 5]! |= 1 << (i & 31);
  }
  const bs: number[] = [];
  const bsOr: number[] = [];
  const plain: number[] = [];
  let cardB = 0;
  let cardP = 0;
  for (let r = 0; r < 7; r++) {
    let t = performance.now();
    const a = setOfWords(words);
    const b = setOfWords(diffWords);
    const t1 = performance.now();
    const u = unionOf(a, b);
    cardB = u.cardinality();
    bsOr.push(performance.now() - t1);
    bs.push(performance.now() - t);
    t = performance.now();
    const out = new Uint32Array(words);
    for (let w = 0; w < out.length; w++) out[w]! |= diffWords[w]!;
    let c = 0;
    for (let w = 0; w < out.length; w++) c += popcount(out[w]!);
    cardP = c;
    plain.push(performance.now() - t);
  }
  if (cardB !== cardP) throw new Error(`bitset union ${cardB} != Uint32Array union ${cardP}`);
  // The digest-diff half at full size: two 512 MiB maps differing in 0.5 % of the chunks, pages compared first.
  const mapA = Buffer.alloc(n * 32);
  const mapB = Buffer.from(mapA);
  for (let k = 0; k < n / 200; k++) mapB[Math.floor(Math.random() * n) * 32] = 1;
  const tDiff = performance.now();
  const diff = digestDiffSet(mapA, mapB, n);
  const diffMs = performance.now() - tDiff;
  const res = {
    bits: n, setBits: cardB, bitsetMs: median(bs), bitsetOrMs: median(bsOr), uint32ArrayMs: median(plain), digestDiffMs: diffMs, diffBits: diff.cardinality(),
  };
  say(`changed-only union of 16 Mi chunks (${cardB} set), median of 7: bitset ${res.bitsetMs.toFixed(1)} ms (of which or + cardinality ` +
    `${res.bitsetOrMs.toFixed(1)} ms, the rest copying the tracker words in), Uint32Array OR + popcount ${res.uint32ArrayMs.toFixed(1)} ms; ` +
    `digest diff of two 512 MiB maps ${diffMs.toFixed(0)} ms (${res.diffBits} differ)`);
  return res;
}

/**
 * CPU seconds of a process (all its threads, exited ones included), of its
 * main thread, and of its other threads alive now — from /proc. Taken
 * before and after a restore: threads that ended in between (the agent's
 * restore workers) are total − main − others.
 */
async function threadCpu(pid: number): Promise<{ total: number; main: number; threads: Map<string, number> }> {
  const threads = new Map<string, number>();
  const { readdir } = await import('node:fs/promises');
  for (const tid of await readdir(`/proc/${pid}/task`).catch(() => [] as string[])) {
    const v = await readFile(`/proc/${pid}/task/${tid}/stat`, 'utf8').catch(() => '');
    if (!v) continue;
    const f = v.slice(v.lastIndexOf(')') + 2).split(' ');
    threads.set(tid, (Number(f[11]) + Number(f[12])) / 100);
  }
  return { total: await cpuSeconds(pid), main: threads.get(String(pid)) ?? 0, threads };
}

/** Per-GiB CPU between two threadCpu snapshots of `pid`: main thread, other threads alive at both, the rest (threads that ended or started in between). */
function cpuSplit(pid: number, a: ThreadCpu, b: ThreadCpu, gib: number): { main: number; others: number; rest: number } {
  let others = 0;
  for (const [tid, v] of b.threads) if (tid !== String(pid) && a.threads.has(tid)) others += v - a.threads.get(tid)!;
  const main = b.main - a.main;
  return { main: main / gib, others: others / gib, rest: (b.total - a.total - main - others) / gib };
}
type ThreadCpu = Awaited<ReturnType<typeof threadCpu>>;

/** User + system CPU seconds of a process so far (all its threads), from /proc/PID/stat. */
async function cpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
}

function popcount(v: number): number {
  v -= (v >>> 1) & 0x55555555;
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

async function main(): Promise<void> {
  const out: Record<string, unknown> = { at: new Date().toISOString() };
  if (PARTS.includes('bitset')) out.bitset = bitsetBench();
  const appl = await startAppliance(['db1'], { auditEvery: 0 });
  try {
    if (PARTS.includes('full')) out.full = await fullRestoreBench(appl);
    if (PARTS.includes('pgbench')) out.pgbench = await pgbenchRestoreBench(appl);
    if (PARTS.includes('changed')) out.changedOnly = await changedOnlyBench(appl);
  } finally {
    await appl.close();
  }
  await mkdir('.bench', { recursive: true });
  await writeFile('.bench/restore.json', JSON.stringify(out, null, 2) + '\n');
}

main().then(() => void exitAfterFlush(0), (e) => {
  process.stderr.write(`bench-restore: ${e?.stack ?? e}\n`);
  void exitAfterFlush(1);
});
