/**
 * Instant-mount benchmark (`node dist/scripts/bench-mount.js` after
 * `npm run build`; not a test): seconds from the start of the agent's
 * LocalMounter.mount to PostgreSQL's first answer out of recovery (primary
 * copy) and to its first answer at all (standby copy), for app-consistent
 * pgbench images of a ≈1 GiB and a ≈8 GiB volume, served by the appliance's
 * NbdServer from the chunk store, each mount with its own copy-on-write
 * overlay (appliance/nbd/cow-overlay.ts; BENCH_COW=nbdkit puts nbdkit's cow
 * filter in front of a read-only export instead),
 * attached with nbdfuse + a loop device. Medians of BENCH_RUNS (3) mounts;
 * the ratio 8 GiB / 1 GiB; where the time goes (attach, mount, WAL, prepare,
 * start = postmaster spawn to first answer; inside start, from the server
 * log: redo, end-of-recovery checkpoint); clone creation time for the 1st
 * and the 10th of 10 clones of the 1 GiB image running at once.
 *
 * All images are built first; round i then mounts every size once (the
 * order reversed on odd rounds), so a load that drifts weighs on all sizes.
 *
 * Env: BENCH_SIZES_GIB ("1,8"), BENCH_SCALES ("10,80": pgbench -i scale per
 * size), BENCH_RUNS (3), BENCH_CLONES (10), BENCH_DIRECT_IO (0/1),
 * BENCH_PG_SETTINGS (JSON of extra per-start settings, e.g.
 * '{"recovery_init_sync_method":"fsync"}' to compare with the default syncfs).
 * BENCH_AB=deferFlush|directIo|pageCache: every run mounts twice more, with
 * and without deferFlush (barrier=0 while preparing), loop direct I/O, or
 * the index reader's page cache (1 page vs the default; each from a fresh
 * ImageSource), alternating, and prints both medians. Every mount prints
 * its store reads (chunk and page loads that missed the caches).
 * Writes .bench/mount.json.
 */
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdLocalMounter, type NbdLocalMount } from '../agent/mount/nbd-local-mounter.js';
import { NbdfuseAttacher } from '../agent/mount/nbdfuse-attacher.js';
import { e2eFixture, type E2eFixture } from './lab/e2e-fixture.js';
import { ImageIndexReader } from '../appliance/store/image-index.js';
import { ImageSource } from '../appliance/nbd/image-source.js';
import { CowOverlay } from '../appliance/nbd/cow-overlay.js';
import { buildPgImage, grantOf, serveCow, serveImage, walSourceOf, type PgImage } from './lab/mount-image-fixture.js';

const GiB = 1024 ** 3;
const SIZES = (process.env.BENCH_SIZES_GIB ?? '1,8').split(',').map(Number);
const SCALES = (process.env.BENCH_SCALES ?? '10,80').split(',').map(Number);
const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const CLONES = Number(process.env.BENCH_CLONES ?? 10);
const DIRECT_IO = process.env.BENCH_DIRECT_IO === '1';
const COW = process.env.BENCH_COW ?? 'overlay';
const PG_SETTINGS = JSON.parse(process.env.BENCH_PG_SETTINGS ?? '{}') as Record<string, string>;
const PAGE_CACHE_DEFAULT = ImageIndexReader.pageCacheSize;

/** What the appliance did for one mount (load-independent, unlike its time): image reads, overlay writes, flushes. */
const io = { reads: 0, readBytes: 0, writes: 0, writeBytes: 0, flushes: 0 };
/** Wall-clock times of overlay writes and flushes, to place them between the server log's events. */
const ioTimes: Array<{ t: number; kind: 'w' | 'f' }> = [];
function countIo(): void {
  const read = ImageSource.prototype.read;
  ImageSource.prototype.read = function (offset: number, length: number) {
    io.reads++;
    io.readBytes += length;
    return read.call(this, offset, length);
  };
  const writeData = CowOverlay.prototype.writeData;
  CowOverlay.prototype.writeData = function (offset: number, bytes: Buffer) {
    io.writes++;
    io.writeBytes += bytes.length;
    ioTimes.push({ t: Date.now(), kind: 'w' });
    return writeData.call(this, offset, bytes);
  };
  const flush = CowOverlay.prototype.flush;
  CowOverlay.prototype.flush = function () {
    io.flushes++;
    ioTimes.push({ t: Date.now(), kind: 'f' });
    return flush.call(this);
  };
}
countIo();
const ioLine = (): string => `image reads ${io.reads} (${(io.readBytes / 2 ** 20).toFixed(1)} MiB), overlay writes ${io.writes} (${(io.writeBytes / 2 ** 20).toFixed(1)} MiB), flushes ${io.flushes}`;
const say = (m: string) => process.stdout.write(m + '\n');
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;
const r3 = (x: number) => Math.round(x * 1000) / 1000;

/** Seconds between server log events (log_line_prefix '%m '): start → redo done → end-of-recovery checkpoint done → ready. */
async function logPhases(logFile: string): Promise<Record<string, number>> {
  const lines = (await readFile(logFile, 'utf8')).split('\n');
  const at = (re: RegExp) => {
    const l = lines.find((x) => re.test(x));
    const m = l && /^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})/.exec(l);
    return m ? Date.parse(m[1]!.replace(' ', 'T') + 'Z') : NaN;
  };
  const start = at(/starting PostgreSQL/);
  const out: Record<string, number> = {};
  const rel = (name: string, re: RegExp) => {
    const t = at(re);
    if (!Number.isNaN(t) && !Number.isNaN(start)) out[name] = (t - start) / 1000;
  };
  rel('redoStarts', /redo starts at/);
  rel('consistent', /consistent recovery state reached/);
  rel('redoDone', /redo done at/);
  rel('checkpointDone', /checkpoint complete/);
  rel('readOnlyReady', /ready to accept read-only connections/);
  rel('ready', /ready to accept connections/);
  if (process.env.BENCH_PRINT_LOG === '1') say(lines.join('\n'));
  // Overlay writes / flushes between the log's events (PostgreSQL's steps), from the postmaster's start on.
  const marks: Array<[string, number]> = [
    ['start', start], ['consistent', at(/consistent recovery state reached/)], ['newTimeline', at(/selected new timeline ID/)],
    ['archiveRecoveryComplete', at(/archive recovery complete/)], ['ready', at(/ready to accept connections/)],
  ].filter(([, t]) => !Number.isNaN(t)) as Array<[string, number]>;
  const parts: string[] = [];
  for (let k = 0; k < marks.length; k++) {
    const from = marks[k]![1];
    const to = k + 1 < marks.length ? marks[k + 1]![1] : Infinity;
    const inside = ioTimes.filter((x) => x.t >= from && x.t < to);
    parts.push(`${marks[k]![0]}→: ${inside.filter((x) => x.kind === 'w').length}w ${inside.filter((x) => x.kind === 'f').length}f`);
  }
  const before = ioTimes.filter((x) => x.t < start);
  say(`    before the postmaster: ${before.filter((x) => x.kind === 'w').length}w ${before.filter((x) => x.kind === 'f').length}f; ${parts.join(', ')}`);
  return out;
}

interface SizeResult {
  volumeGiB: number;
  scale: number;
  primary: number[];
  standby: number[];
  phases: Array<Record<string, number>>;
  logPhases: Array<Record<string, number>>;
}

/** One mount with its own writable layer: the appliance's overlay (default) or nbdkit's cow filter (BENCH_COW=nbdkit). */
async function mountOnce(fx: E2eFixture, mounter: NbdLocalMounter, img: PgImage, nbd: Awaited<ReturnType<typeof serveImage>>, asStandby: boolean): Promise<NbdLocalMount> {
  const uri = COW === 'nbdkit' ? await serveCow(fx, nbd.server.uri(nbd.newName())) : nbd.server.uri(await nbd.newWritableName());
  return mounter.mount(grantOf(img, uri), walSourceOf(img), { asStandby });
}

/** One size's image, its export and its mounter, built once; the mount rounds of all sizes then interleave. */
interface SizeBench {
  fx: E2eFixture;
  mounter: NbdLocalMounter;
  img: PgImage;
  nbd: Awaited<ReturnType<typeof serveImage>>;
  reads: { n: number; ms: number; seen: Set<string> };
  size: SizeResult;
  ab: Record<string, number[]>;
  on: NbdLocalMounter;
  off: NbdLocalMounter;
  stateDir: string;
  runBase: string;
}

async function prepareSize(volumeGiB: number, scale: number): Promise<SizeBench> {
  const fx = e2eFixture();
  try {
    const stateDir = await mkdtemp(join(tmpdir(), 'bsn-bench-mount-'));
    const runBase = await mkdtemp(join(tmpdir(), 'bsn-bench-mounts-'));
    await chmod(runBase, 0o711);
    fx.defer('dirs', async () => {
      await rm(stateDir, { recursive: true, force: true });
      await rm(runBase, { recursive: true, force: true });
    });
    const mounter = new NbdLocalMounter({
      stateDir, runBase, attacher: new NbdfuseAttacher({ directIo: DIRECT_IO }), pgSettings: { log_line_prefix: '%m ', ...PG_SETTINGS },
    });
    const t = Date.now();
    const img = await buildPgImage(fx, { volumeSize: volumeGiB * GiB, poolSize: 2 * volumeGiB * GiB + GiB, pgbenchScale: scale });
    say(`  image of ${volumeGiB} GiB (pgbench scale ${scale}) built in ${((Date.now() - t) / 1000).toFixed(0)} s`);
    // Store reads per mount (cache misses of the export's chunk LRU and page cache): what grows with the image?
    const reads = { n: 0, ms: 0, seen: new Set<string>() };
    const inner = img.store.get.bind(img.store);
    img.store.get = async (d: Buffer) => {
      const t0 = performance.now();
      reads.seen.add(d.toString('hex'));
      try { return await inner(d); } finally { reads.n++; reads.ms += performance.now() - t0; }
    };
    // Chunks come through getMany (one pread per run of adjacent chunks): count its digests too.
    const innerMany = img.store.getMany?.bind(img.store);
    if (innerMany) {
      img.store.getMany = async (ds: Buffer[]) => {
        const t0 = performance.now();
        for (const d of ds) reads.seen.add(d.toString('hex'));
        try { return await innerMany(ds); } finally { reads.n += ds.length; reads.ms += performance.now() - t0; }
      };
    }
    const nbd = await serveImage(fx, img);
    // The A/B pair: the same mounter with one choice flipped (deferFlush off, or loop direct I/O on).
    const AB = process.env.BENCH_AB;
    const on = AB === 'directIo'
      ? new NbdLocalMounter({ stateDir, runBase, attacher: new NbdfuseAttacher({ directIo: true }), pgSettings: PG_SETTINGS })
      : mounter;
    const off = AB === 'directIo'
      ? new NbdLocalMounter({ stateDir, runBase, attacher: new NbdfuseAttacher({ directIo: false }), pgSettings: PG_SETTINGS })
      : new NbdLocalMounter({ stateDir, runBase, attacher: new NbdfuseAttacher({ directIo: DIRECT_IO }), pgSettings: PG_SETTINGS, deferFlush: false });
    return {
      fx, mounter, img, nbd, reads, on, off, stateDir, runBase,
      size: { volumeGiB, scale, primary: [], standby: [], phases: [], logPhases: [] },
      ab: { on: [], off: [] },
    };
  } catch (e) {
    await fx.dispose();
    throw e;
  }
}

/** Round i of one size: the A/B pair if asked for, then a primary and a standby mount. */
async function mountRound(b: SizeBench, i: number): Promise<void> {
  const { fx, mounter, img, nbd, reads, size, ab, on, off, runBase } = b;
  const AB = process.env.BENCH_AB;
  say(`  ${size.volumeGiB} GiB, round ${i + 1} (load ${loadavg()[0]!.toFixed(2)})`);
  if (AB === 'pageCache') {
    // One map page cached (as before 2026-11-30) vs the default, alternating.
    for (const k of i % 2 ? ['off', 'on'] : ['on', 'off']) {
      ImageIndexReader.pageCacheSize = k === 'on' ? PAGE_CACHE_DEFAULT : 1;
      const src = await serveImage(fx, img); // a fresh source: cold caches, as each appliance mount has
      reads.n = 0;
      reads.ms = 0;
      const m = await mountOnce(fx, mounter, img, src, false);
      ab[k]!.push(m.secondsToFirstQuery);
      say(`  ${AB} ${k}: ${m.secondsToFirstQuery.toFixed(3)} s, store reads ${reads.n} (${reads.ms.toFixed(0)} ms) ${JSON.stringify(Object.fromEntries(Object.entries(m.phases).map(([x, v]) => [x, r3(v)])))}`);
      await mounter.unmount(m.mountId);
    }
    ImageIndexReader.pageCacheSize = PAGE_CACHE_DEFAULT;
  }
  if (AB === 'deferFlush' || AB === 'directIo') {
    for (const [k, mm] of (i % 2 ? [['off', off], ['on', on]] : [['on', on], ['off', off]]) as Array<[string, NbdLocalMounter]>) {
      const m = await mountOnce(fx, mm, img, nbd, false);
      ab[k]!.push(m.secondsToFirstQuery);
      say(`  ${AB} ${k}: ${m.secondsToFirstQuery.toFixed(3)} s ${JSON.stringify(Object.fromEntries(Object.entries(m.phases).map(([x, v]) => [x, r3(v)])))}`);
      await mm.unmount(m.mountId);
    }
  }
  for (const standby of [false, true]) {
    reads.n = 0;
    reads.ms = 0;
    reads.seen.clear();
    Object.assign(io, { reads: 0, readBytes: 0, writes: 0, writeBytes: 0, flushes: 0 });
    ioTimes.length = 0;
    const m = await mountOnce(fx, mounter, img, nbd, standby);
    say(`  store reads during the mount: ${reads.n} of ${reads.seen.size} blobs (${reads.ms.toFixed(0)} ms summed); ${ioLine()}`);
    (standby ? size.standby : size.primary).push(m.secondsToFirstQuery);
    if (!standby) {
      size.phases.push(m.phases);
      size.logPhases.push(await logPhases(join(runBase, `${m.mountId}.run`, 'postgres.log')));
    }
    say(`  ${standby ? 'standby' : 'primary'} #${i + 1}: ${m.secondsToFirstQuery.toFixed(3)} s ${JSON.stringify(Object.fromEntries(Object.entries(m.phases).map(([k, v]) => [k, r3(v)])))}`);
    await mounter.unmount(m.mountId);
  }
}

/** CLONES mounts of one image up at once: seconds to first query of each, with the time to create its overlay. */
async function cloneRun(b: SizeBench): Promise<number[]> {
  const clones: number[] = [];
  const up: string[] = [];
  try {
    for (let i = 0; i < CLONES; i++) {
      const t = Date.now();
      const m = await mountOnce(b.fx, b.mounter, b.img, b.nbd, false);
      up.push(m.mountId);
      clones.push(m.secondsToFirstQuery);
      say(`  clone ${i + 1}: ${m.secondsToFirstQuery.toFixed(3)} s (with creating its overlay: ${((Date.now() - t) / 1000).toFixed(3)} s)`);
    }
  } finally {
    for (const id of up.reverse()) await b.mounter.unmount(id).catch((e: unknown) => say(`  unmount ${id}: ${String(e)}`));
  }
  return clones;
}

async function main(): Promise<void> {
  say(`mount benchmark: sizes ${SIZES.join(', ')} GiB, ${RUNS} runs each, ${CLONES} clones, loop direct-io ${DIRECT_IO ? 'on' : 'off'}, cow ${COW}, settings ${JSON.stringify(PG_SETTINGS)}, load ${loadavg()[0]!.toFixed(2)}`);
  // Every size's image first, then the rounds interleaved (round i mounts each size once, the order reversed on odd
  // rounds): a load that drifts during the run then weighs on every size alike instead of on whichever ran last.
  const benches: SizeBench[] = [];
  let clones: number[] | undefined;
  try {
    for (const [i, gib] of SIZES.entries()) benches.push(await prepareSize(gib, SCALES[i] ?? 10));
    for (let i = 0; i < RUNS; i++) {
      for (const b of i % 2 ? [...benches].reverse() : benches) await mountRound(b, i);
    }
    if (CLONES > 0 && benches[0]) clones = await cloneRun(benches[0]);
    if (process.env.BENCH_AB) for (const b of benches) say(`  ${b.size.volumeGiB} GiB ${process.env.BENCH_AB} medians: on ${r3(median(b.ab.on!))} s, off ${r3(median(b.ab.off!))} s`);
  } finally {
    for (const b of benches.reverse()) await b.fx.dispose();
  }
  const results: SizeResult[] = [...benches].sort((a, b) => SIZES.indexOf(a.size.volumeGiB) - SIZES.indexOf(b.size.volumeGiB)).map((b) => b.size);
  const summary = results.map((r) => ({
    volumeGiB: r.volumeGiB, scale: r.scale, primaryMedian: r3(median(r.primary)), standbyMedian: r3(median(r.standby)),
    phasesMedian: Object.fromEntries(Object.keys(r.phases[0] ?? {}).map((k) => [k, r3(median(r.phases.map((p) => p[k]!)))])),
    serverLogMedian: Object.fromEntries(Object.keys(r.logPhases[0] ?? {}).map((k) => [k, r3(median(r.logPhases.map((p) => p[k] ?? NaN)))])),
  }));
  for (const s of summary) {
    say(`${s.volumeGiB} GiB: primary ${s.primaryMedian} s, standby ${s.standbyMedian} s (medians); phases ${JSON.stringify(s.phasesMedian)}; server log ${JSON.stringify(s.serverLogMedian)}`);
  }
  // Largest over smallest size, whatever order BENCH_SIZES_GIB ran them in (8,1 printed the inverse before).
  const bySize = [...summary].sort((a, b) => a.volumeGiB - b.volumeGiB);
  const [small, big] = [bySize[0], bySize[bySize.length - 1]];
  const ratio = summary.length >= 2 ? r3(big!.primaryMedian / small!.primaryMedian) : undefined;
  const standbyRatio = summary.length >= 2 ? r3(big!.standbyMedian / small!.standbyMedian) : undefined;
  if (ratio !== undefined) say(`ratio ${big!.volumeGiB} GiB / ${small!.volumeGiB} GiB: primary ${ratio}, standby ${standbyRatio} (goal ≤ 1.2)`);
  if (clones?.length) say(`clones: 1st ${clones[0]!.toFixed(3)} s, ${clones.length}th ${clones[clones.length - 1]!.toFixed(3)} s`);
  await mkdir('.bench', { recursive: true });
  await writeFile('.bench/mount.json', JSON.stringify({ at: new Date().toISOString(), directIo: DIRECT_IO, cow: COW, pgSettings: PG_SETTINGS, results, summary, ratio, standbyRatio, clones }, null, 2) + '\n');
}

main().then(() => process.exit(0), (e: unknown) => {
  console.error(e);
  process.exit(1);
});
