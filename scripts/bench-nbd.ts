/**
 * NBD benchmark (`npm run bench`, after bench.ts; not a test). A fully
 * allocated image of random data (BENCH_NBD_MIB, default 384 MiB, 64 KiB
 * chunks) is committed to a real FsChunkStore and also written as a raw file
 * on the same filesystem. Measured, median of BENCH_RUNS (default 3) each:
 *
 *  - sequential read with nbdcopy to null: from the appliance's NBD server
 *    (read-ahead off and on) and from `nbdkit file` serving the raw file;
 *  - `dd` of the raw file to /dev/null (bs=1M);
 *  - nbdcopy of the raw file into a writable export (a new copy-on-write
 *    overlay each run, nbdcopy's final flush included).
 *
 * Everything is warm in the page cache (the raw file and the packs were
 * just written): this compares the servers' own cost, not the disk.
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
    const store = await FsChunkStore.open(join(work, 'store'));
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
    const measure = async (label: string, fn: () => Promise<unknown>): Promise<void> => {
      const secs: number[] = [];
      for (let r = 0; r < RUNS; r++) secs.push(await timed(fn));
      results[label] = size / median(secs) / MB;
      say(`  ${label.padEnd(44)} ${results[label]!.toFixed(0).padStart(6)} MB/s  (runs: ${secs.map((s) => s.toFixed(2)).join(', ')} s)`);
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
    await measure('nbdcopy from nbdkit file (raw file)', nbdcopyToNull(kitUri));

    for (const readAhead of [0, 8]) {
      const source = await ImageSource.open(store, rootDigest, { cacheChunks: 64, readAhead });
      const server = await NbdServer.start({ resolve: fixedExport(NAME, readOnlyExport(source)) });
      await measure(`nbdcopy from blocksnap NBD (read-ahead ${readAhead})`, nbdcopyToNull(server.uri(NAME)));
      await server.close();
    }

    {
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

    const ours = Math.max(results['nbdcopy from blocksnap NBD (read-ahead 0)']!, results['nbdcopy from blocksnap NBD (read-ahead 8)']!);
    const ratio = ours / results['nbdcopy from nbdkit file (raw file)']!;
    say(`  blocksnap / nbdkit: ${ratio.toFixed(2)}× (goal ≥ 0.8×)`);
    await mkdir('.bench', { recursive: true });
    await writeFile('.bench/nbd-results.json', JSON.stringify({ mib: MIB, chunkSize: CS, runs: RUNS, mbPerSec: results, ratioToNbdkit: ratio }, null, 2) + '\n');
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
