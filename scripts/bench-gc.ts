/**
 * Garbage-collection benchmark (issue 11), `node dist/scripts/bench-gc.js`:
 *
 * 1. The mark set: the `bitset` package vs a plain Uint8Array bitmap (one
 *    byte per blob) vs a Uint32Array bitmap (one bit per blob), for the blob
 *    counts of a large store: set every 3rd id in random order (the mark),
 *    then test every id (the sweep).
 * 2. GC of a store holding 100 images of a changing volume, then pruned to
 *    10: mark time with 100 and with 10 images (it should follow the unique
 *    index pages, not images × volume size), bytes reclaimed vs expected.
 * 3. Ingest throughput (a full backup of a fresh volume through the real
 *    Ingest) alone and while GC runs in a loop on the same store.
 *
 * Scaled down from the 4 GiB volume to BENCH_GC_VOLUME_MIB (default
 * 1024) so it runs in a few minutes on the 2-core lab machine. Images are
 * committed through the real Ingest and commit (appliance/retention/store-rig.ts).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import BitSet from 'bitset';
import { StoreRig, neededBytes, mutateRigVolumeInPlace, rigVolume, type RigVolume } from '../appliance/retention/store-rig.js';

const MiB = 1 << 20;
const VOLUME_MIB = Number(process.env.BENCH_GC_VOLUME_MIB ?? 1024);
const CHUNK = 64 * 1024;
const IMAGES = Number(process.env.BENCH_GC_IMAGES ?? 100);
const CHANGED = 32; // chunks changed per image, in a hot region of 64 chunks of one index page (a hot table)

function ms(t0: number): number {
  return performance.now() - t0;
}

function shuffled(n: number, step: number): Uint32Array {
  const ids = new Uint32Array(Math.ceil(n / step));
  for (let i = 0; i < ids.length; i++) ids[i] = i * step;
  let s = 12345;
  for (let i = ids.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) >>> 0;
    const j = s % (i + 1);
    [ids[i], ids[j]] = [ids[j]!, ids[i]!];
  }
  return ids;
}

function benchMarkSets(n: number): Record<string, { markMs: number; sweepMs: number; bytes: number }> {
  const ids = shuffled(n, 3);
  const out: Record<string, { markMs: number; sweepMs: number; bytes: number }> = {};
  {
    const heap0 = process.memoryUsage().heapUsed;
    let t = performance.now();
    const b = new BitSet();
    for (const id of ids) b.set(id, 1);
    const markMs = ms(t);
    t = performance.now();
    let live = 0;
    for (let i = 0; i < n; i++) live += b.get(i);
    const sweepMs = ms(t);
    if (live !== ids.length) throw new Error('bitset count');
    out.bitset = { markMs, sweepMs, bytes: Math.max(b.data.length * 4, process.memoryUsage().heapUsed - heap0) };
  }
  {
    // The same package, grown to its final size before the mark (random-order sets otherwise grow it word by word).
    let t = performance.now();
    const b = new BitSet();
    b.set(n - 1, 1);
    b.set(n - 1, 0);
    for (const id of ids) b.set(id, 1);
    const markMs = ms(t);
    t = performance.now();
    let live = 0;
    for (let i = 0; i < n; i++) live += b.get(i);
    const sweepMs = ms(t);
    if (live !== ids.length) throw new Error('bitset count');
    out['bitset-presized'] = { markMs, sweepMs, bytes: b.data.length * 4 };
  }
  {
    let t = performance.now();
    const b = new Uint8Array(n);
    for (const id of ids) b[id] = 1;
    const markMs = ms(t);
    t = performance.now();
    let live = 0;
    for (let i = 0; i < n; i++) live += b[i]!;
    const sweepMs = ms(t);
    if (live !== ids.length) throw new Error('u8 count');
    out.uint8 = { markMs, sweepMs, bytes: n };
  }
  {
    let t = performance.now();
    const b = new Uint32Array(Math.ceil(n / 32));
    for (const id of ids) b[id >>> 5]! |= 1 << (id & 31);
    const markMs = ms(t);
    t = performance.now();
    let live = 0;
    for (let i = 0; i < n; i++) live += (b[i >>> 5]! >>> (i & 31)) & 1;
    const sweepMs = ms(t);
    if (live !== ids.length) throw new Error('u32 count');
    out.uint32 = { markMs, sweepMs, bytes: b.byteLength };
  }
  return out;
}

async function main(): Promise<void> {
  const report: Record<string, unknown> = { volumeMiB: VOLUME_MIB, images: IMAGES, chunkSize: CHUNK, changedPerImage: CHANGED };
  // 1. mark sets
  const sets: Record<string, unknown> = {};
  for (const n of [65_536, 1_048_576, 16_777_216]) sets[String(n)] = benchMarkSets(n);
  report.markSet = sets;
  for (const [n, r] of Object.entries(sets)) {
    for (const [k, v] of Object.entries(r as Record<string, { markMs: number; sweepMs: number; bytes: number }>)) {
      console.log(`mark set ${n.padStart(9)} blobs  ${k.padEnd(15)} mark ${v.markMs.toFixed(1).padStart(7)} ms  sweep ${v.sweepMs.toFixed(1).padStart(7)} ms  ${(v.bytes / MiB).toFixed(2)} MiB`);
    }
  }

  const dir = await mkdtemp(join(tmpdir(), 'blocksnap-bench-gc-'));
  try {
    const rig = await StoreRig.open(join(dir, 'data'));
    // 2. 100 images of a changing volume
    let v: RigVolume = rigVolume('pgdata', VOLUME_MIB * MiB, CHUNK);
    const chunks = (VOLUME_MIB * MiB) / CHUNK;
    const pages = Math.ceil(chunks / 1024);
    let t = performance.now();
    await rig.commit(v);
    const fullS = ms(t) / 1000;
    t = performance.now();
    let s = 7;
    for (let n = 1; n < IMAGES; n++) {
      s = (s * 1103515245 + 12345) >>> 0;
      const page = s % pages;
      const base = page * 1024;
      const hot = Math.min(64, chunks - base);
      const changed = Array.from({ length: CHANGED }, (_, i) => base + ((i * 7 + n * 3) % hot)).filter((x, i, a) => a.indexOf(x) === i).sort((a, b) => a - b);
      v = mutateRigVolumeInPlace(v, changed);
      await rig.commit(v, changed);
    }
    const incS = ms(t) / 1000;
    console.log(`built ${IMAGES} images of a ${VOLUME_MIB} MiB volume: full ${fullS.toFixed(1)} s, ${IMAGES - 1} incrementals ${incS.toFixed(1)} s`);
    const mark100 = await rig.retention.gc({ dryRun: true });
    const before = rig.store.stats();
    await rig.retention.prune({ keep: { last: 10 } });
    const mark10 = await rig.retention.gc({ dryRun: true });
    const needed = await neededBytes(rig.store, rig.catalog.listImages().map((i) => i.rootDigest));
    t = performance.now();
    const gc = await rig.retention.gc({});
    const gcS = ms(t) / 1000;
    const after = rig.store.stats();
    report.gc = {
      mark100: { seconds: mark100.markSeconds, scanSeconds: mark100.scanSeconds, pagesVisited: mark100.pagesVisited, liveBlobs: mark100.liveBlobs, blobs: mark100.blobs },
      mark10: { seconds: mark10.markSeconds, scanSeconds: mark10.scanSeconds, pagesVisited: mark10.pagesVisited, liveBlobs: mark10.liveBlobs, blobs: mark10.blobs },
      gcAfterPrune: { seconds: gcS, markSeconds: gc.markSeconds, sweepSeconds: gc.sweepSeconds, packsDeleted: gc.packsDeleted, packsRewritten: gc.packsRewritten },
      bytesBefore: before.bytes, bytesAfter: after.bytes, neededBytes: needed, reclaimed: gc.reclaimedBytes,
      expectedReclaim: before.bytes - needed, deadBytesAfter: gc.deadBytesAfter,
    };
    const line = (n: number, m: typeof mark100) => console.log(`GC mark, ${String(n).padStart(3)} images: ${m.markSeconds.toFixed(2)} s = index scan ${m.scanSeconds.toFixed(2)} s (${m.blobs} blobs) + map walk ${(m.markSeconds - m.scanSeconds).toFixed(2)} s (${m.pagesVisited} distinct pages loaded; ${n * pages} if every image's pages were walked)`);
    line(IMAGES, mark100);
    line(10, mark10);
    console.log(`GC after prune 100 → 10: ${gcS.toFixed(2)} s (mark ${gc.markSeconds.toFixed(2)} s, sweep ${gc.sweepSeconds.toFixed(2)} s), ${gc.packsDeleted} packs deleted, ${gc.packsRewritten} rewritten`);
    console.log(`store ${(before.bytes / MiB).toFixed(1)} MiB → ${(after.bytes / MiB).toFixed(1)} MiB; the 10 need ${(needed / MiB).toFixed(1)} MiB; reclaimed ${(gc.reclaimedBytes / MiB).toFixed(1)} MiB of ${((before.bytes - needed) / MiB).toFixed(1)} MiB not needed (${(100 * gc.reclaimedBytes / Math.max(1, before.bytes - needed)).toFixed(1)} %; dead bytes left in packs ≥ 50 % live: ${(gc.deadBytesAfter / MiB).toFixed(2)} MiB)`);

    // 3. ingest while GC runs: alone; with GCs back to back the whole time (the worst case); and with
    // one GC that has real work (the previous round's ingest image deleted: its packs are swept).
    const INGEST_MIB = Number(process.env.BENCH_GC_INGEST_MIB ?? 256);
    const alone: number[] = [];
    const loopGc: number[] = [];
    const oneGc: number[] = [];
    let previous: string | undefined;
    const ingest = async (): Promise<{ rate: number; imageId: string }> => {
      const vol = rigVolume(`ingest-${Math.random().toString(36).slice(2, 8)}`, INGEST_MIB * MiB, CHUNK);
      const t0 = performance.now();
      const m = await rig.commit(vol);
      return { rate: INGEST_MIB / (ms(t0) / 1000), imageId: m.imageId };
    };
    for (let round = 0; round < 3; round++) {
      let r = await ingest();
      alone.push(r.rate);
      previous = r.imageId;
      let stop = false;
      let gcs = 0;
      const loop = (async () => {
        while (!stop) {
          await rig.retention.gc({});
          gcs++;
        }
      })();
      r = await ingest();
      stop = true;
      await loop;
      loopGc.push(r.rate);
      const loopImage = r.imageId;
      // One GC with work: the two images just made are deleted, their packs go while the next ingest runs
      // (the newer one's packs only if its writer was settled before the GC's T0: pending packs are left).
      await rig.retention.deleteImage(previous);
      await rig.retention.deleteImage(loopImage);
      const single = rig.retention.gc({});
      r = await ingest();
      const sg = await single;
      oneGc.push(r.rate);
      await rig.retention.deleteImage(r.imageId);
      await rig.retention.gc({});
      console.log(`round ${round + 1}: ingest alone ${alone[round]!.toFixed(1)} MiB/s; with GCs back to back (${gcs} GCs) ${loopGc[round]!.toFixed(1)} MiB/s; `
        + `with one GC reclaiming ${(sg.reclaimedBytes / MiB).toFixed(0)} MiB (${(sg.markSeconds + sg.sweepSeconds).toFixed(2)} s) ${oneGc[round]!.toFixed(1)} MiB/s`);
    }
    const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
    report.ingest = { mib: INGEST_MIB, aloneMiBs: alone, loopGcMiBs: loopGc, oneGcMiBs: oneGc, ratioLoop: med(loopGc) / med(alone), ratioOne: med(oneGc) / med(alone) };
    console.log(`ingest throughput, median of 3: with one GC ${(med(oneGc) / med(alone)).toFixed(2)}× of alone, with GCs back to back ${(med(loopGc) / med(alone)).toFixed(2)}× (goal ≥ 0.8×)`);
    await rig.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  console.log(JSON.stringify(report));
}

await main();
