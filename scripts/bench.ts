/**
 * blocksnap benchmark (`npm run bench`; not a test). Two parts:
 *
 *  A. End to end, real processes: pgbench scale 50 on a 4 GiB file-backed
 *     volume; full backups, then incrementals after 2 000 and 20 000
 *     transactions; next to `dd iflag=direct` of the same volume (the
 *     physical read limit). Wall time, bytes read / sent / stored, MB/s.
 *  B. Commit cost of an incremental of the same 3 000 chunks on a 4 GiB and
 *     on a 1 TiB sparse volume (the appliance's ingest + index + manifest
 *     path, in process, on a real store): should not grow with volume size.
 *
 * Every figure is the median of BENCH_RUNS runs (default 3). Results go to
 * stdout as a table and to .bench/results.json.
 */
import { execa } from 'execa';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { PgCluster } from './lab/pg-cluster.js';
import { createPgbenchVolume } from './lab/pgbench-volume.js';
import type { VolumeLab } from './lab/volume-lab.js';
import { applianceCmd, spawnAgent, spawnAppliance, type ApplianceProcess, type Daemon } from './lab/processes.js';
import { Ingest } from '../appliance/server/ingest.js';
import { FsChunkStore } from '../appliance/store/fs-chunk-store.js';
import { buildManifest, newImageId, writeManifest } from '../appliance/store/manifest.js';
import { zstdCompress } from '../proto/shared/zstd.js';
import { createLogger } from '../proto/shared/log.js';
import { imageRootDigest } from '../proto/shared/image-root.js';
import { exitAfterFlush } from '../proto/shared/cli-exit.js';

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const SCALE = Number(process.env.BENCH_SCALE ?? 50);
const GiB = 1024 ** 3;
const MB = 1e6;
const log = createLogger('bench', 'warn');

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const say = (m: string) => process.stdout.write(m + '\n');

interface BackupRun { snapshotSeconds: number; transferSeconds: number; seconds: number; bytesRead: number; bytesSent: number; bytesStored: number; chunksRead: number; chunksSent: number; nonzeroBytes: number }

async function partA(): Promise<Record<string, unknown>> {
  let lab: VolumeLab | undefined;
  let pg: PgCluster | undefined;
  let appliance: ApplianceProcess | undefined;
  let agent: Daemon | undefined;
  try {
    ({ lab, pg } = await createPgbenchVolume(SCALE, (m) => say(`A: ${m}`)));

    const dd: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      const t = performance.now();
      await execa('dd', [`if=${lab.volumeDevice}`, 'of=/dev/null', 'bs=4M', 'iflag=direct', 'status=none']);
      dd.push((4 * GiB) / MB / ((performance.now() - t) / 1000));
    }
    say(`A: dd iflag=direct of the volume: median ${median(dd).toFixed(0)} MB/s`);

    const dataDir = join(lab.root, 'appliance', 'data');
    await mkdir(dataDir, { recursive: true });
    const add = await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json']);
    appliance = await spawnAppliance(dataDir, { logFile: join(lab.root, 'appliance.log') });
    const configFile = join(lab.root, 'agent.json');
    await writeFile(configFile, JSON.stringify({
      appliance: appliance.url, agent: 'db1', token: add.json.token, stateDir: join(lab.root, 'agent-state'), volumes: [lab.volume],
    }));
    agent = spawnAgent(configFile, join(lab.root, 'agent.log'));
    for (let i = 0; i < 100; i++) {
      const r = await applianceCmd(dataDir, ['agents', 'list', '--json']);
      if (r.json?.some((a: any) => a.connected)) break;
      await new Promise((res) => setTimeout(res, 200));
    }

    const backup = async (full: boolean): Promise<BackupRun> => {
      const t = performance.now();
      const r = await applianceCmd(dataDir, ['backup', 'db1', 'pgdata', ...(full ? ['--full'] : []), '--json']);
      const seconds = (performance.now() - t) / 1000;
      if (!r.json?.ok) throw new Error(`backup failed: ${r.stdout} ${r.stderr}`);
      const s = r.json.stats;
      return {
        snapshotSeconds: s.snapshotSeconds ?? 0, transferSeconds: s.readSeconds ?? 0,
        seconds, bytesRead: s.bytesRead, bytesSent: s.bytesSent, bytesStored: s.bytesStored, chunksRead: s.chunksRead,
        // In a full, every non-zero chunk is sent: that is the volume's allocated data.
        chunksSent: s.chunksSent, nonzeroBytes: s.chunksSent * 65536,
      };
    };
    const fulls: BackupRun[] = [];
    for (let i = 0; i < RUNS; i++) fulls.push(await backup(true));
    const inc = async (tx: number) => {
      const runs: BackupRun[] = [];
      for (let i = 0; i < RUNS; i++) {
        await pg!.pgbench({ transactions: Math.ceil(tx / 4), clients: 4 });
        runs.push(await backup(false));
      }
      return runs;
    };
    const only = !!process.env.BENCH_ONLY_FULL;
    const inc2k = only ? fulls : await inc(2000);
    const inc20k = only ? fulls : await inc(20000);
    const row = (name: string, rs: BackupRun[]) => ({
      name,
      seconds: median(rs.map((r) => r.seconds)),
      snapshotSeconds: median(rs.map((r) => r.snapshotSeconds)),
      transferSeconds: median(rs.map((r) => r.transferSeconds)),
      transferMBps: median(rs.map((r) => r.nonzeroBytes / MB / r.transferSeconds)),
      mbRead: median(rs.map((r) => r.bytesRead)) / MB,
      mbAllocated: median(rs.map((r) => r.nonzeroBytes)) / MB,
      mbSent: median(rs.map((r) => r.bytesSent)) / MB,
      mbStored: median(rs.map((r) => r.bytesStored)) / MB,
      chunksSent: median(rs.map((r) => r.chunksSent)),
      readMBps: median(rs.map((r) => r.bytesRead / MB / r.seconds)),
      allocatedMBps: median(rs.map((r) => r.nonzeroBytes / MB / r.seconds)),
    });
    return { ddMBps: median(dd), ddRuns: dd, rows: [row('full', fulls), row('incremental after 2 000 tx', inc2k), row('incremental after 20 000 tx', inc20k)] };
  } finally {
    await agent?.stop().catch(() => undefined);
    await appliance?.stop().catch(() => undefined);
    await pg?.destroy().catch(() => undefined);
    await lab?.destroy().catch((e) => say(`lab cleanup failed: ${e}`));
  }
}

/** The appliance's cost of committing an incremental of `changed` chunks onto a basis. */
async function commitCost(volumeSize: number, changed: Buffer[], indexes: number[]): Promise<number[]> {
  const dir = await mkdtemp(join(tmpdir(), 'bsn-bench-'));
  try {
    const store = await FsChunkStore.open(join(dir, 'store'));
    const cs = 65536;
    // Basis: a full of a sparse volume with the same chunks set (pages exist where we patch).
    const base = await Ingest.open(store, { jobId: 'basis', volumeSize, chunkSize: cs, mode: 'full' }, log);
    const frames = changed.map((c) => zstdCompress(c));
    await base.addBatch(1, indexes.map((index, i) => chunk(index, changed[i]!, frames[i]!)));
    // The agent's side of the end-to-end check: the full digest map and its root (not timed: the agent computes it).
    const digests = Buffer.alloc(Math.ceil(volumeSize / cs) * 32);
    const rootOf = (plain: Buffer[]) => {
      indexes.forEach((index, i) => createHash('sha256').update(plain[i]!).digest().copy(digests, index * 32));
      return imageRootDigest(volumeSize, cs, digests);
    };
    let { rootDigest } = await base.finish(Math.ceil(volumeSize / cs), rootOf(changed));
    let basisImageId = newImageId();
    const times: number[] = [];
    for (let run = 0; run < RUNS + 1; run++) {
      // New content for the same slots every run, so every chunk is really stored.
      const data = changed.map(() => randomBytes(cs));
      const zs = data.map((d) => zstdCompress(d));
      const expectedRoot = rootOf(data);
      const t = performance.now();
      const ing = await Ingest.open(store, { jobId: `inc${run}`, volumeSize, chunkSize: cs, mode: 'incremental', basisRootDigest: rootDigest }, log);
      for (let b = 0; b < indexes.length; b += 64) {
        await ing.addBatch(b / 64 + 1, indexes.slice(b, b + 64).map((index, i) => chunk(index, data[b + i]!, zs[b + i]!)));
      }
      ({ rootDigest } = await ing.finish(Math.ceil(volumeSize / cs), expectedRoot));
      const m = buildManifest({
        imageId: newImageId(new Date(Date.now() + run * 1000)), agent: 'bench', volume: 'v', volumeSize, chunkSize: cs, kind: 'incremental',
        basisImageId, jobId: `inc${run}`, rootDigest: rootDigest.toString('hex'), stats: {},
      });
      await writeManifest(join(dir, 'store'), m);
      basisImageId = m.imageId;
      if (run > 0) times.push((performance.now() - t) / 1000); // run 0 warms caches
    }
    await store.close();
    return times;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function chunk(index: number, plain: Buffer, frame: Buffer) {
  return { index, digest: createHash('sha256').update(plain).digest(), zero: false, data: frame, plainLength: plain.length };
}

async function partB(): Promise<Record<string, unknown>> {
  const n = 3000;
  // Spread the chunks over the first 4 GiB (65 536 slots) so both volumes patch the same pages.
  const idx = new Set<number>();
  while (idx.size < n) idx.add(Math.floor(Math.random() * 65536));
  const indexes = [...idx].sort((a, b) => a - b);
  const changed = indexes.map(() => randomBytes(65536));
  say(`B: commit of an incremental of ${n} chunks on 4 GiB and 1 TiB sparse volumes`);
  const small = await commitCost(4 * GiB, changed, indexes);
  const large = await commitCost(1024 * GiB, changed, indexes);
  return { chunks: n, seconds4GiB: median(small), seconds1TiB: median(large), ratio: median(large) / median(small), runs4GiB: small, runs1TiB: large };
}

async function main(): Promise<void> {
  const started = new Date().toISOString();
  const b = await partB();
  say(`B: 4 GiB ${(b.seconds4GiB as number).toFixed(3)} s, 1 TiB ${(b.seconds1TiB as number).toFixed(3)} s, ratio ${(b.ratio as number).toFixed(2)}`);
  const a = process.env.BENCH_SKIP_E2E ? null : await partA();
  if (a) {
    say(`\nA: dd iflag=direct of the 4 GiB volume: ${(a.ddMBps as number).toFixed(0)} MB/s (median of ${RUNS})`);
    say('| backup | wall s (CLI to result) | snapshot s | transfer s | MB read | MB sent (zstd) | MB stored | chunks sent | MB/s of sent chunks, wall | MB/s, transfer |');
    say('|---|---|---|---|---|---|---|---|---|---|');
    for (const r of a.rows as any[]) {
      say(`| ${r.name} | ${r.seconds.toFixed(2)} | ${r.snapshotSeconds.toFixed(2)} | ${r.transferSeconds.toFixed(2)} | ${r.mbRead.toFixed(0)} | ${r.mbSent.toFixed(1)} | ${r.mbStored.toFixed(1)} | ${r.chunksSent} | ${r.allocatedMBps.toFixed(0)} | ${r.transferMBps.toFixed(0)} |`);
    }
    say('(MB stored of the full is its median over repeated fulls: after the first, everything dedups; see .bench/results.json)');
  }
  await mkdir('.bench', { recursive: true });
  await writeFile(join('.bench', 'results.json'), JSON.stringify({ started, runs: RUNS, scale: SCALE, commitCost: b, endToEnd: a }, null, 2));
}

main().then(() => void exitAfterFlush(0), (e) => {
  process.stderr.write(`bench: ${e?.stack ?? e}\n`);
  void exitAfterFlush(1);
});
