/**
 * NBD benchmark (`npm run bench`, after bench.ts; not a test). A fully
 * allocated image of random data (BENCH_NBD_MIB, default 384 MiB, 64 KiB
 * chunks) is committed to a real FsChunkStore and also written as a raw file
 * on the same filesystem. Measured, median of BENCH_RUNS (default 3) each:
 *
 *  - sequential read with nbdcopy to null: from `nbdkit file` serving the
 *    raw file and from the appliance's NBD server, its chunks read and
 *    re-hashed on the main thread (one pread per run of adjacent chunks, the
 *    default) or in the store's read workers
 *    (BENCH_NBD_READ_WORKERS, default 2), the three taking turns in every
 *    round (BENCH_NBD_READ_AHEAD: read-ahead chunks, default 0);
 *  - `dd` of the raw file to /dev/null (bs=1M);
 *  - nbdcopy of the raw file into a writable export (a new copy-on-write
 *    overlay each run, nbdcopy's final flush included; BENCH_NBD_WRITE=0
 *    skips it).
 *
 * Everything is warm in the page cache (the raw file and the packs were
 * just written): this compares the servers' own cost, not the disk.
 * Each row also prints the bench process's CPU seconds per pass (the
 * server's own cost for blocksnap rows; the load barely changes it).
 * Results go to stdout and .bench/nbd-results.json.
 */
import { execa } from 'execa';
import { createHash, randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BLOB_CHUNK } from '../appliance/store/chunk-store.js';
import { FsChunkStore } from '../appliance/store/fs-chunk-store.js';
import { readBlobRuns } from '../appliance/store/blob-runs.js';
import { ImageIndexBuilder } from '../appliance/store/image-index.js';
import { ImageSource } from '../appliance/nbd/image-source.js';
import { NbdServer, fixedExport } from '../appliance/nbd/nbd-server.js';
import { readOnlyExport } from '../appliance/nbd/read-only-export.js';
import { CowOverlay } from '../appliance/nbd/cow-overlay.js';
import { writableExport } from '../appliance/nbd/writable-export.js';
import { exitAfterFlush } from '../proto/shared/cli-exit.js';

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const MIB = Number(process.env.BENCH_NBD_MIB ?? 384);
const CS = 65536;
const NAME = randomBytes(16).toString('hex');
const MB = 1e6;
const READ_AHEAD = Number(process.env.BENCH_NBD_READ_AHEAD ?? 0);

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const say = (m: string): void => { process.stdout.write(m + '\n'); };

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t = performance.now();
  await fn();
  return (performance.now() - t) / 1000;
}

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'blocksnap-bench-nbd-'));
  const stops: Array<() => Promise<unknown>> = [];
  try {
    const size = MIB * 1024 * 1024;
    const raw = join(work, 'image.raw');
    say(`NBD: building a ${MIB} MiB image of random data (${size / CS} chunks of ${CS / 1024} KiB)`);
    const store = await FsChunkStore.open(join(work, 'store'), { readWorkers: Number(process.env.BENCH_NBD_READ_WORKERS ?? 2) });
    stops.push(() => store.close());
    const writer = store.openWriter();
    const builder = await ImageIndexBuilder.create({ store, writer, volumeSize: size, chunkSize: CS });
    const fh = await open(raw, 'w');
    for (let i = 0; i < size / CS; i++) {
      const plain = randomBytes(CS);
      await fh.write(plain, 0, CS, i * CS);
      const digest = createHash('sha256').update(plain).digest();
      await writer.put(BLOB_CHUNK, digest, plain);
      await builder.set(i, digest);
    }
    await fh.close();
    const { rootDigest } = await builder.finish();
    await writer.flush();

    const results: Record<string, number> = {};
    const secsOf = new Map<string, number[]>();
    // CPU seconds of this process (all its threads) per round: for blocksnap rows the
    // server's cost, which the machine's load barely changes (nbdkit's rows: ≈ 0).
    const cpuOf = new Map<string, number[]>();
    const timedRound = async (label: string, fn: () => Promise<unknown>): Promise<void> => {
      const c0 = process.cpuUsage();
      const t = await timed(fn);
      const c = process.cpuUsage(c0);
      if (!secsOf.has(label)) secsOf.set(label, []);
      secsOf.get(label)!.push(t);
      if (!cpuOf.has(label)) cpuOf.set(label, []);
      cpuOf.get(label)!.push((c.user + c.system) / 1e6);
    };
    const cpuResults: Record<string, number> = {};
    const report = (label: string): void => {
      const secs = secsOf.get(label)!;
      results[label] = size / median(secs) / MB;
      cpuResults[label] = median(cpuOf.get(label)!);
      say(`  ${label.padEnd(44)} ${results[label]!.toFixed(0).padStart(6)} MB/s  (runs: ${secs.map((x) => x.toFixed(2)).join(', ')} s; ` +
        `bench process CPU median ${cpuResults[label]!.toFixed(2)} s)`);
    };
    const measure = async (label: string, fn: () => Promise<unknown>): Promise<void> => {
      for (let r = 0; r < RUNS; r++) await timedRound(label, fn);
      report(label);
    };
    const nbdcopyToNull = (uri: string) => () => execa('nbdcopy', [uri, 'null:']);

    await measure('dd if=raw of=/dev/null bs=1M', () => execa('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M']));

    const port = await freePort();
    const nbdkit = execa('nbdkit', ['--foreground', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '--readonly', 'file', raw], { reject: false });
    stops.push(async () => { nbdkit.kill('SIGTERM'); await nbdkit; });
    const kitUri = `nbd://127.0.0.1:${port}/`;
    const deadline = Date.now() + 20_000;
    while ((await execa('nbdinfo', ['--size', kitUri], { reject: false })).exitCode !== 0) {
      if (Date.now() > deadline) throw new Error('nbdkit did not start');
      await new Promise((r) => setTimeout(r, 50));
    }

    // The load of this shared machine swings: nbdkit and the two read paths
    // take turns in every round (A/B alternating), medians over the rounds.
    // "main thread" is the store without read workers (the appliance's
    // default): getMany reads each run of adjacent chunks with one pread and
    // re-hashes them on the JS thread (blob-runs.ts).
    const mainOnly = Object.create(store, { getMany: { value: (ds: Buffer[]) => readBlobRuns(store, ds) } }) as FsChunkStore;
    for (const until = Date.now() + 60_000; Number(process.env.BENCH_NBD_READ_WORKERS ?? 2) > 0 && !store.readWorkersReady;) {
      if (Date.now() > until) throw new Error('the read workers did not start');
      await store.getMany([]);
      await new Promise((r) => setTimeout(r, 20));
    }
    const servers: Array<{ label: string; uri: string; close(): Promise<void> }> = [];
    for (const [label, s] of [['nbdcopy from blocksnap NBD (main thread)', mainOnly], ['nbdcopy from blocksnap NBD (read workers)', store]] as const) {
      const source = await ImageSource.open(s, rootDigest, { cacheChunks: 64, readAhead: READ_AHEAD });
      const server = await NbdServer.start({ resolve: fixedExport(NAME, readOnlyExport(source)) });
      stops.push(() => server.close());
      servers.push({ label, uri: server.uri(NAME), close: () => server.close() });
    }
    const KIT = 'nbdcopy from nbdkit file (raw file)';
    for (let r = 0; r < RUNS; r++) {
      await timedRound(KIT, nbdcopyToNull(kitUri));
      for (const s of r % 2 ? [...servers].reverse() : servers) await timedRound(s.label, nbdcopyToNull(s.uri));
    }
    report(KIT);
    for (const s of servers) report(s.label);

    if (process.env.BENCH_NBD_WRITE !== '0') {
      const source = await ImageSource.open(store, rootDigest);
      let n = 0;
      let overlay: CowOverlay | undefined;
      const server = await NbdServer.start({
        resolve: async (name) => (name === NAME && overlay ? writableExport(source, overlay) : undefined),
      });
      stops.push(() => server.close());
      await measure('nbdcopy raw → blocksnap writable export (overlay)', async () => {
        await overlay?.close();
        overlay = await CowOverlay.create(join(work, `overlay-${n++}`), { volumeSize: size, chunkSize: CS, rootDigest });
        await execa('nbdcopy', [raw, server.uri(NAME)]);
      });
      await overlay?.close();
    }

    const ratio = results['nbdcopy from blocksnap NBD (read workers)']! / results[KIT]!;
    say(`  blocksnap / nbdkit: ${ratio.toFixed(2)}× (goal ≥ 0.8×); main thread: ${(results['nbdcopy from blocksnap NBD (main thread)']! / results[KIT]!).toFixed(2)}×`);
    await mkdir('.bench', { recursive: true });
    await writeFile('.bench/nbd-results.json', JSON.stringify({ mib: MIB, chunkSize: CS, runs: RUNS, mbPerSec: results, cpuSeconds: cpuResults, ratioToNbdkit: ratio }, null, 2) + '\n');
  } finally {
    for (const s of stops.reverse()) await s().catch(() => undefined);
    await rm(work, { recursive: true, force: true });
  }
}

main().then(
  () => exitAfterFlush(0),
  (e: unknown) => {
    process.stderr.write(`bench-nbd: ${e instanceof Error ? e.stack : String(e)}\n`);
    exitAfterFlush(1);
  },
);
