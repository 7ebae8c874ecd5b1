/**
 * Changed-block tracking benchmark (`node dist/scripts/bench-tracking.js`
 * after `npm run build`; not a test). pgbench scale 50 on a 4 GiB
 * file-backed volume, PostgreSQL 15, the agent as a real process, an
 * in-process appliance (no scheduled audits).
 *
 *  1. Tracking overhead: pgbench tps with a TracefsTracker on the volume vs
 *     without, interleaved in pairs (order alternating), medians + ratio.
 *  2. Precision: after W pgbench transactions an AUDITED incremental reports
 *     what the tracker marked (trackedChunks) and what really changed
 *     (auditChanged) over the same interval; ratio tracked/changed.
 *     Before it, after the same workload, a plain incremental (tracker-
 *     driven): wall time, bytes read and sent, index pages written.
 *     W = 2 000 and 20 000 at 64 KiB chunks, W = 2 000 at 4 KiB chunks; and
 *     once more at 64 KiB / 2 000 with `sync -f` of the volume right before
 *     each job: the freeze then flushes little, and what it flushes is what
 *     the tracker counts in both generations around a snapshot.
 *  3. Cost of the chunk size: bitmap memory (chunkCount / 8 bytes per
 *     generation), image index (ceil(chunkCount / 1024) pages of 32 KiB).
 *
 * Env: BENCH_SCALE (50), BENCH_TPS_PAIRS (5), BENCH_TPS_TX (3000 per run),
 * BENCH_CHUNK_SIZES ("65536,4096"), BENCH_TX ("2000,20000"; the other chunk
 * sizes run only the first). Writes .bench/tracking.json.
 */
import { execa } from 'execa';
import { mkdir, writeFile } from 'node:fs/promises';
import { loadavg as osLoadavg } from 'node:os';
import { join } from 'node:path';
import { PgCluster } from './lab/pg-cluster.js';
import { createVolumeLab, type VolumeLab } from './lab/volume-lab.js';
import { TracefsTracker } from '../agent/cbt/tracefs/tracefs-tracker.js';
import { startAppliance, type ApplianceHarness } from './lab/appliance-harness.js';
import { spawnAgent, type Daemon } from './lab/processes.js';
import { BlocksnapError } from '../proto/errors.js';
import { exitAfterFlush } from '../proto/shared/cli-exit.js';

const SCALE = Number(process.env.BENCH_SCALE ?? 50);
const PAIRS = Number(process.env.BENCH_TPS_PAIRS ?? 5);
const TPS_TX = Number(process.env.BENCH_TPS_TX ?? 3000);
const CHUNK_SIZES = (process.env.BENCH_CHUNK_SIZES ?? '65536,4096').split(',').map(Number);
const WORKLOADS = (process.env.BENCH_TX ?? '2000,20000').split(',').map(Number);
const GiB = 1024 ** 3;
const VOLUME = 4 * GiB;
const CLIENTS = 4;

const say = (m: string) => process.stdout.write(m + '\n');
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const mib = (b: number) => b / 1024 / 1024;

interface JobRow {
  chunkSize: number; transactions: number; kind: 'tracker' | 'audit';
  seconds: number; changeSource: string; fallbackReason: string;
  chunksRead: number; bytesRead: number; chunksSent: number; bytesSent: number; bytesStored: number; pagesWritten: number;
  trackedChunks: number; presync?: boolean; auditChanged?: number; auditMissed?: number; auditExtra?: number; ratio?: number;
}

async function tpsOverhead(lab: VolumeLab, pg: PgCluster) {
  const run = async (tracked: boolean) => {
    await pg.query('checkpoint');
    let tracker: TracefsTracker | null = null;
    if (tracked) {
      tracker = new TracefsTracker();
      await tracker.start({ device: lab.volumeDevice, chunkSize: 65536, generation: 1 });
    }
    const cpu = process.cpuUsage();
    try {
      const r = await pg.pgbench({ transactions: Math.ceil(TPS_TX / CLIENTS), clients: CLIENTS });
      const used = process.cpuUsage(cpu);
      return { tps: r.tps, trackerCpuSeconds: tracked ? (used.user + used.system) / 1e6 : 0 };
    } finally {
      await tracker?.stop();
    }
  };
  say(`tps: warm-up, then ${PAIRS} interleaved pairs of ${TPS_TX} transactions, ${CLIENTS} clients`);
  await run(false);
  const on: number[] = [];
  const off: number[] = [];
  const cpu: number[] = [];
  for (let i = 0; i < PAIRS; i++) {
    for (const tracked of i % 2 === 0 ? [true, false] : [false, true]) {
      const r = await run(tracked);
      (tracked ? on : off).push(r.tps);
      if (tracked) cpu.push(r.trackerCpuSeconds);
      say(`  pair ${i + 1} tracking ${tracked ? 'on ' : 'off'}: ${r.tps.toFixed(0)} tps`);
    }
  }
  return { on, off, medianOn: median(on), medianOff: median(off), ratio: median(on) / median(off), trackerCpuSecondsPerRun: median(cpu) };
}

async function chunkSizeRun(lab: VolumeLab, pg: PgCluster, chunkSize: number, workloads: number[]) {
  let appl: ApplianceHarness | undefined;
  let agent: Daemon | undefined;
  const rows: JobRow[] = [];
  try {
    appl = await startAppliance(['db1'], { auditEvery: 0, dataDir: await mkdirp(join(lab.root, `appliance-${chunkSize}`)) });
    const stateDir = await mkdirp(join(lab.root, `agent-state-${chunkSize}`));
    const configFile = join(lab.root, `agent-${chunkSize}.json`);
    await writeFile(configFile, JSON.stringify({
      appliance: appl.url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes: [{ ...lab.volume, chunkSize }],
    }));
    agent = spawnAgent(configFile, join(lab.root, `agent-${chunkSize}.log`));
    for (let i = 0; i < 150 && !appl.app.router.connectedAgents().some((a) => a.agent === 'db1'); i++) await sleep(100);
    const a = appl;
    const job = async (mode: 'full' | 'incremental', audit: boolean) => {
      const t = performance.now();
      const j = a.app.router.startJob('db1', 'pgdata', mode, { audit });
      const outcome = await j.done;
      const seconds = (performance.now() - t) / 1000;
      if (!outcome.ok) throw new BlocksnapError('E_INTERNAL', `${mode} backup failed: ${JSON.stringify(outcome)}`);
      return { seconds, st: a.app.catalog.job(j.id)!.stats as Record<string, any> };
    };
    const row = (transactions: number, kind: JobRow['kind'], r: { seconds: number; st: Record<string, any> }): JobRow => ({
      chunkSize, transactions, kind, seconds: r.seconds, changeSource: r.st.changeSource, fallbackReason: r.st.fallbackReason,
      chunksRead: r.st.chunksRead, bytesRead: r.st.bytesRead, chunksSent: r.st.chunksSent, bytesSent: r.st.bytesSent,
      bytesStored: r.st.bytesStored, pagesWritten: r.st.pagesWritten, trackedChunks: r.st.trackedChunks,
      ...(kind === 'audit'
        ? { auditChanged: r.st.auditChanged, auditMissed: r.st.auditMissed, auditExtra: r.st.auditExtra, ratio: r.st.trackedChunks / Math.max(1, r.st.auditChanged) }
        : {}),
    });
    say(`chunk ${chunkSize}: full`);
    const full = await job('full', false);
    say(`  full ${full.seconds.toFixed(1)} s, ${mib(full.st.bytesRead).toFixed(0)} MiB read`);
    // One unreported round so the measured intervals all follow a tracker-driven job.
    await pg.pgbench({ transactions: Math.ceil(workloads[0]! / CLIENTS), clients: CLIENTS });
    await job('incremental', false);
    for (const tx of workloads) {
      await pg.pgbench({ transactions: Math.ceil(tx / CLIENTS), clients: CLIENTS });
      rows.push(row(tx, 'tracker', await job('incremental', false)));
      await pg.pgbench({ transactions: Math.ceil(tx / CLIENTS), clients: CLIENTS });
      rows.push(row(tx, 'audit', await job('incremental', true)));
      for (const r of rows.slice(-2)) {
        say(`  ${tx} tx ${r.kind}: ${r.seconds.toFixed(2)} s, read ${r.chunksRead} chunks, sent ${r.chunksSent}, tracked ${r.trackedChunks}` +
          (r.kind === 'audit' ? `, changed ${r.auditChanged}, missed ${r.auditMissed}, ratio ${r.ratio!.toFixed(3)}` : `, source ${r.changeSource}`));
      }
    }
    if (chunkSize === 65536) {
      // Same interval, but the filesystem synced just before each snapshot: what
      // the freeze then flushes (and the tracker counts in both generations) shrinks.
      const tx = workloads[0]!;
      const syncfs = () => execa('sync', ['-f', lab.volumeMount]);
      await pg.pgbench({ transactions: Math.ceil(tx / CLIENTS), clients: CLIENTS });
      await syncfs();
      rows.push({ ...row(tx, 'tracker', await job('incremental', false)), presync: true });
      await pg.pgbench({ transactions: Math.ceil(tx / CLIENTS), clients: CLIENTS });
      await syncfs();
      rows.push({ ...row(tx, 'audit', await job('incremental', true)), presync: true });
      const r = rows.at(-1)!;
      say(`  ${tx} tx audit, syncfs before each snapshot: tracked ${r.trackedChunks}, changed ${r.auditChanged}, ratio ${r.ratio!.toFixed(3)}`);
    }
    const chunkCount = Math.ceil(VOLUME / chunkSize);
    const pages = Math.ceil(chunkCount / 1024);
    return {
      chunkSize, chunkCount, fullSeconds: full.seconds, fullBytesRead: full.st.bytesRead,
      bitmapBytes: Math.ceil(chunkCount / 8), indexPages: pages, indexBytes: pages * 32 * 1024, rootBytes: 40 + 32 * pages, rows,
    };
  } finally {
    await agent?.stop().catch((e) => say(`agent stop failed: ${e}`));
    await appl?.close().catch((e) => say(`appliance close failed: ${e}`));
  }
}

async function main(): Promise<void> {
  const started = new Date().toISOString();
  let lab: VolumeLab | undefined;
  let pg: PgCluster | undefined;
  try {
    lab = await createVolumeLab({ volumeSize: VOLUME, poolSize: 16 * GiB, name: 'pgdata' });
    pg = new PgCluster({ dataDir: join(lab.volumeMount, 'pg'), settings: { max_wal_size: '2GB' } });
    await pg.initdb();
    await pg.start();
    say(`pgbench -i -s ${SCALE} on a ${VOLUME / GiB} GiB volume`);
    await pg.pgbenchInit(SCALE);
    await pg.query('checkpoint');
    const tps = await tpsOverhead(lab, pg);
    const sizes = [];
    for (const cs of CHUNK_SIZES) sizes.push(await chunkSizeRun(lab, pg, cs, cs === 65536 ? WORKLOADS : WORKLOADS.slice(0, 1)));
    const loadavg = osLoadavg().map((x) => x.toFixed(2)).join(' ');

    say(`\n## Tracking benchmark (pgbench scale ${SCALE}, ${VOLUME / GiB} GiB volume; shared 2-core VM, noisy: load ${loadavg})\n`);
    say('| chunk | tx | job | s | source | chunks read | MiB read | chunks sent | MiB sent | index pages written | tracked | changed | missed | tracked/changed |');
    say('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    for (const s of sizes) {
      for (const r of s.rows) {
        say(`| ${r.chunkSize / 1024} KiB | ${r.transactions} | ${r.kind === 'audit' ? 'audited (reads all)' : 'tracker-driven'}${r.presync ? ', syncfs first' : ''} | ${r.seconds.toFixed(2)} | ${r.changeSource} | ${r.chunksRead} | ${mib(r.bytesRead).toFixed(1)} | ${r.chunksSent} | ${mib(r.bytesSent).toFixed(1)} | ${r.pagesWritten} | ${r.trackedChunks} | ${r.auditChanged ?? ''} | ${r.auditMissed ?? ''} | ${r.ratio?.toFixed(3) ?? ''} |`);
      }
    }
    say('\n| chunk | chunks | bitmap per generation | index pages (full image) | index size | root | full s |');
    say('|---|---|---|---|---|---|---|');
    for (const s of sizes) {
      say(`| ${s.chunkSize / 1024} KiB | ${s.chunkCount} | ${(s.bitmapBytes / 1024).toFixed(0)} KiB | ${s.indexPages} | ${mib(s.indexBytes).toFixed(0)} MiB | ${(s.rootBytes / 1024).toFixed(1)} KiB | ${s.fullSeconds.toFixed(1)} |`);
    }
    say(`\n| pgbench tps | median | runs |\n|---|---|---|`);
    say(`| tracking on | ${tps.medianOn.toFixed(0)} | ${tps.on.map((x) => x.toFixed(0)).join(', ')} |`);
    say(`| tracking off | ${tps.medianOff.toFixed(0)} | ${tps.off.map((x) => x.toFixed(0)).join(', ')} |`);
    say(`\non/off = ${(tps.ratio * 100).toFixed(1)} % (goal ≥ 98 %); tracker CPU ${tps.trackerCpuSecondsPerRun.toFixed(2)} s per run`);
    await mkdir('.bench', { recursive: true });
    await writeFile(join('.bench', 'tracking.json'), JSON.stringify({ started, scale: SCALE, volumeBytes: VOLUME, loadavg, tps, chunkSizes: sizes }, null, 2));
  } finally {
    await pg?.destroy().catch((e) => say(`pg cleanup failed: ${e}`));
    await lab?.destroy().catch((e) => say(`lab cleanup failed: ${e}`));
  }
}

async function mkdirp(dir: string): Promise<string> {
  await mkdir(dir, { recursive: true });
  return dir;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

main().then(() => void exitAfterFlush(0), (e) => {
  process.stderr.write(`bench-tracking: ${e?.stack ?? e}\n`);
  void exitAfterFlush(1);
});
