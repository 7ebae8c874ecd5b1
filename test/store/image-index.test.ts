import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  BLOB_CHUNK,
  BLOB_PAGE,
  BLOB_ROOT,
  ZERO_DIGEST,
  type BlobLocation,
  type BlobType,
  type BlobWriter,
  type ChunkStore,
  type PutResult,
} from '../../appliance/store/chunk-store.js';
import { ImageIndexBuilder, ImageIndexReader, type ImageIndexResult } from '../../appliance/store/image-index.js';
import { PAGE_BYTES, SLOTS_PER_PAGE, encodeRoot, imageGeometry, imageRootDigest } from '../../proto/shared/image-root.js';
import { MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';

/**
 * Every store implementation runs the same tests: the lead adds FsChunkStore
 * here. A factory gets a fresh empty directory it may use.
 */
type StoreFactory = (dir: string) => ChunkStore | Promise<ChunkStore>;
const factories: Array<[string, StoreFactory]> = [['MemoryChunkStore', () => new MemoryChunkStore()]];

const sha256 = (b: Buffer): Buffer => createHash('sha256').update(b).digest();
const randomDigest = (): Buffer => sha256(randomBytes(16));
const TIB = 2 ** 40;

/** Counts reads so tests can prove which pages were loaded. */
class CountingStore implements ChunkStore {
  gets: string[] = [];
  constructor(readonly inner: ChunkStore) {}
  openWriter(): BlobWriter { return this.inner.openWriter(); }
  get(d: Buffer): Promise<Buffer> { this.gets.push(d.toString('hex')); return this.inner.get(d); }
  has(d: Buffer): boolean { return this.inner.has(d); }
  locate(d: Buffer): BlobLocation | undefined { return this.inner.locate(d); }
  stats(): { packs: number; blobs: number; bytes: number } { return this.inner.stats(); }
  close(): Promise<void> { return this.inner.close(); }
}

/** Records every put so tests count page and root writes. */
class CountingWriter implements BlobWriter {
  puts: Array<{ type: BlobType; digest: string }> = [];
  constructor(readonly inner: BlobWriter) {}
  put(type: BlobType, digest: Buffer, plain: Buffer, compressed?: Buffer): Promise<PutResult> {
    this.puts.push({ type, digest: digest.toString('hex') });
    return this.inner.put(type, digest, plain, compressed);
  }
  flush(): Promise<number> { return this.inner.flush(); }
  abort(): Promise<void> { return this.inner.abort(); }
  count(type: BlobType): number { return this.puts.filter((p) => p.type === type).length; }
}

interface Built { result: ImageIndexResult; writer: CountingWriter }

/** Build and flush one image from patches given in increasing index order. */
async function build(
  store: ChunkStore, volumeSize: number, chunkSize: number,
  patches: Iterable<[number, Buffer]>, basis?: Buffer,
): Promise<Built> {
  const writer = new CountingWriter(store.openWriter());
  const builder = await ImageIndexBuilder.create({
    store, writer, volumeSize, chunkSize, basis: basis ? { rootDigest: basis } : undefined,
  });
  for (const [i, d] of patches) await builder.set(i, d);
  const result = await builder.finish();
  await writer.flush();
  return { result, writer };
}

/** What the root must be for a model (N*32 bytes), computed without the builder. */
function expectedFromModel(model: Buffer, volumeSize: number, chunkSize: number) {
  const g = imageGeometry(volumeSize, chunkSize);
  const pages = Buffer.alloc(g.pageCount * 32);
  const zeroPage = Buffer.alloc(PAGE_BYTES);
  for (let p = 0; p < g.pageCount; p++) {
    const page = Buffer.alloc(PAGE_BYTES);
    model.copy(page, 0, p * PAGE_BYTES, Math.min(model.length, (p + 1) * PAGE_BYTES));
    if (!page.equals(zeroPage)) sha256(page).copy(pages, p * 32);
  }
  return { pages, rootDigest: sha256(encodeRoot({ ...g, pages })) };
}

function pageOf(model: Buffer, p: number): Buffer {
  return model.subarray(p * PAGE_BYTES, Math.min(model.length, (p + 1) * PAGE_BYTES));
}

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  await expect(p).rejects.toMatchObject({ code });
}

describe.each(factories)('image index on %s', (_name, makeStore) => {
  let dir: string;
  let store: ChunkStore;

  beforeEach(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'bsn-index-'));
    store = await makeStore(dir);
  });
  afterEach(async () => {
    await store?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('full image: round trip, untouched and all-ZERO pages are ZERO and not stored', async () => {
    const cs = 4096;
    const vs = cs * (3 * SLOTS_PER_PAGE + 10) - 100; // short last chunk, partial last page
    const n = Math.ceil(vs / cs);
    const model = Buffer.alloc(n * 32);
    const patches: Array<[number, Buffer]> = [];
    for (const i of [0, 5, 1023, 3 * 1024 + 9]) {
      const d = randomDigest();
      patches.push([i, d]);
      d.copy(model, i * 32);
    }
    // Page 1 is touched only with ZERO: it must stay ZERO.
    for (const i of [1024, 1500, 2047]) patches.push([i, ZERO_DIGEST]);
    patches.sort((a, b) => a[0] - b[0]);
    const { result, writer } = await build(store, vs, cs, patches);
    const expected = expectedFromModel(model, vs, cs);
    expect(result.rootDigest).toEqual(expected.rootDigest);
    // The agent's side of the end-to-end check computes the same root from the full map alone.
    expect(imageRootDigest(vs, cs, model)).toEqual(result.rootDigest);
    expect(result).toMatchObject({ chunkCount: n, pageCount: 4, pagesWritten: 2, pagesShared: 0, pagesZero: 2 });
    expect(writer.count(BLOB_PAGE)).toBe(2);
    expect(writer.count(BLOB_ROOT)).toBe(1);
    const reader = await ImageIndexReader.open(store, result.rootDigest);
    expect([reader.volumeSize, reader.chunkSize, reader.chunkCount, reader.pageCount]).toEqual([vs, cs, n, 4]);
    expect(reader.pageDigests().map((d) => d.equals(ZERO_DIGEST))).toEqual([false, true, true, false]);
    const all: Buffer[] = [];
    for await (const e of reader.entries()) {
      expect(e.index).toBe(all.length);
      all.push(Buffer.from(e.digest));
    }
    expect(Buffer.concat(all)).toEqual(model);
    const nonZero: number[] = [];
    for await (const e of reader.entries({ skipZero: true })) nonZero.push(e.index);
    expect(nonZero).toEqual([0, 5, 1023, 3081]);
    expect(await reader.digestAt(1023)).toEqual(model.subarray(1023 * 32, 1024 * 32));
    expect(await reader.digestAt(1500)).toEqual(ZERO_DIGEST);
    await expectCode(reader.digestAt(n), 'E_CHUNK_RANGE');
  });

  it('rejects out-of-order, out-of-range and late set() calls', async () => {
    const builder = new ImageIndexBuilder({ store, writer: store.openWriter(), volumeSize: 4096 * 3000, chunkSize: 4096 });
    await builder.set(5, randomDigest());
    await expectCode(builder.set(5, randomDigest()), 'E_PROTOCOL');
    await expectCode(builder.set(4, randomDigest()), 'E_PROTOCOL');
    await expectCode(builder.set(3000, randomDigest()), 'E_CHUNK_RANGE');
    await expectCode(builder.set(-1, randomDigest()), 'E_CHUNK_RANGE');
    await expectCode(builder.set(6.5, randomDigest()), 'E_CHUNK_RANGE');
    await expectCode(builder.set(7, Buffer.alloc(31, 1)), 'E_PROTOCOL');
    await builder.set(2999, randomDigest());
    await builder.finish();
    await expectCode(builder.set(2999 + 0, randomDigest()), 'E_PROTOCOL');
    await expectCode(builder.finish(), 'E_PROTOCOL');
  });

  it('refuses a basis of another geometry, a missing basis and a basis that is not a root', async () => {
    const { result } = await build(store, 4096 * 2048, 4096, [[3, randomDigest()]]);
    const writer = store.openWriter();
    const basis = { rootDigest: result.rootDigest };
    await expectCode(ImageIndexBuilder.create({ store, writer, volumeSize: 4096 * 2049, chunkSize: 4096, basis }), 'E_BASIS');
    await expectCode(ImageIndexBuilder.create({ store, writer, volumeSize: 4096 * 2048, chunkSize: 8192, basis }), 'E_BASIS');
    // Lazily loaded basis: the mismatch surfaces on first use and breaks the builder.
    const lazy = new ImageIndexBuilder({ store, writer, volumeSize: 8192 * 1024, chunkSize: 8192, basis });
    await expectCode(lazy.set(0, randomDigest()), 'E_BASIS');
    await expectCode(lazy.finish(), 'E_PROTOCOL');
    await expectCode(ImageIndexBuilder.create({ store, writer, volumeSize: 4096 * 2048, chunkSize: 4096, basis: { rootDigest: randomDigest() } }), 'E_NOT_FOUND');
    const reader = await ImageIndexReader.open(store, result.rootDigest);
    const pageDigest = reader.pageDigest(0);
    await expectCode(ImageIndexBuilder.create({ store, writer, volumeSize: 4096 * 2048, chunkSize: 4096, basis: { rootDigest: pageDigest } }), 'E_FORMAT');
    await expectCode(ImageIndexReader.open(store, pageDigest), 'E_FORMAT');
  });

  it('rejects a stored page with a non-ZERO slot past the volume end', async () => {
    const cs = 4096;
    const vs = cs * 10;
    const page = Buffer.alloc(PAGE_BYTES);
    randomDigest().copy(page, 0);
    randomDigest().copy(page, 20 * 32); // slot 20 of a 10-chunk volume
    const pageDigest = sha256(page);
    const root = encodeRoot({ ...imageGeometry(vs, cs), pages: pageDigest });
    const w = store.openWriter();
    await w.put(BLOB_PAGE, pageDigest, page);
    await w.put(BLOB_ROOT, sha256(root), root);
    await w.flush();
    const reader = await ImageIndexReader.open(store, sha256(root));
    await expectCode(reader.digestAt(0), 'E_FORMAT');
    const builder = await ImageIndexBuilder.create({ store, writer: store.openWriter(), volumeSize: vs, chunkSize: cs, basis: { rootDigest: sha256(root) } });
    await expectCode(builder.set(1, randomDigest()), 'E_FORMAT');
  });

  it('incremental of incremental matches a reference model over generations', async () => {
    const cs = 4096;
    const vs = cs * (6 * SLOTS_PER_PAGE + 301) - 1000;
    const n = Math.ceil(vs / cs);
    const pageCount = Math.ceil(n / SLOTS_PER_PAGE);
    let model = Buffer.alloc(n * 32);
    let basis: Buffer | undefined;
    let previousPages: Buffer[] = [];
    const counting = new CountingStore(store);
    const nonZeroPages = (m: Buffer) => [...Array(pageCount).keys()].filter((p) => pageOf(m, p).some((b) => b !== 0));

    for (let gen = 0; gen < 8; gen++) {
      const next = Buffer.from(model);
      const patches = new Map<number, Buffer>();
      const setPatch = (i: number, d: Buffer) => { patches.set(i, d); d.copy(next, i * 32); };
      if (gen === 0) {
        // Full: dense pages 0-1, sparse page 2, page 3 untouched, ZERO patches in page 4.
        for (let i = 0; i < 2 * SLOTS_PER_PAGE; i++) if (Math.random() < 0.7) setPatch(i, randomDigest());
        for (let i = 2048; i < 3072; i += 97) setPatch(i, randomDigest());
        for (let i = 4096; i < 5120; i += 50) setPatch(i, ZERO_DIGEST);
        setPatch(n - 1, randomDigest());
      } else if (gen === 3) {
        // Page 2 becomes all ZERO; one chunk of page 0 too.
        for (let i = 2048; i < 3072; i++) if (model.subarray(i * 32, i * 32 + 32).some((b) => b)) setPatch(i, ZERO_DIGEST);
        setPatch(7, ZERO_DIGEST);
      } else if (gen === 5) {
        // Touch chunks with the digest they already have: nothing changes.
        for (let i = 0; i < n; i += 211) setPatch(i, Buffer.from(model.subarray(i * 32, i * 32 + 32)));
      } else if (gen === 6) {
        // No chunk sent at all.
      } else {
        const k = [0, 40, 400, 0, 2000, 0, 0, 5][gen];
        for (let j = 0; j < k; j++) {
          const i = Math.floor(Math.random() * n);
          const r = Math.random();
          setPatch(i, r < 0.2 ? ZERO_DIGEST : r < 0.3 ? Buffer.from(model.subarray(i * 32, i * 32 + 32)) : randomDigest());
        }
        setPatch(2048 + gen, randomDigest()); // revives page 2 after gen 3
      }
      const sorted = [...patches.entries()].sort((a, b) => a[0] - b[0]);
      const touchedPages = new Set(sorted.map(([i]) => Math.floor(i / SLOTS_PER_PAGE)));
      const changed = [...Array(pageCount).keys()].filter((p) => !pageOf(model, p).equals(pageOf(next, p)));
      const nonZeroNext = new Set(nonZeroPages(next));
      const basisNonZero = new Set(nonZeroPages(model));

      counting.gets = [];
      const { result, writer } = await build(counting, vs, cs, sorted, basis);
      const expected = expectedFromModel(next, vs, cs);
      expect(result.rootDigest, `gen ${gen}`).toEqual(expected.rootDigest);
      expect(imageRootDigest(vs, cs, next), `agent-side root, gen ${gen}`).toEqual(result.rootDigest);
      const written = changed.filter((p) => nonZeroNext.has(p));
      expect(writer.count(BLOB_PAGE), `gen ${gen}`).toBe(written.length);
      expect(result.pagesWritten).toBe(written.length);
      expect(result.pagesZero).toBe(pageCount - nonZeroNext.size);
      expect(result.pagesShared).toBe(nonZeroNext.size - written.length);
      // Reads: the basis root plus only the touched pages the basis had stored.
      const expectedGets = basis ? 1 + [...touchedPages].filter((p) => basisNonZero.has(p)).length : 0;
      expect(counting.gets.length, `gen ${gen}`).toBe(expectedGets);
      if (gen === 6) expect(result.rootDigest).toEqual(basis);

      const reader = await ImageIndexReader.open(store, result.rootDigest);
      const pageDigests = reader.pageDigests();
      expect(Buffer.concat(pageDigests)).toEqual(expected.pages);
      for (let p = 0; p < previousPages.length; p++) {
        if (!changed.includes(p)) expect(pageDigests[p]).toEqual(previousPages[p]); // shared, not rewritten
      }
      const seen = Buffer.alloc(n * 32);
      let count = 0;
      for await (const e of reader.entries()) { e.digest.copy(seen, e.index * 32); count++; }
      expect(count).toBe(n);
      expect(seen.equals(next), `gen ${gen}`).toBe(true);
      const from = 1000 + gen * 7;
      const to = 3100;
      const ranged: number[] = [];
      for await (const e of reader.entries({ from, to, skipZero: true })) {
        expect(e.digest).toEqual(next.subarray(e.index * 32, e.index * 32 + 32));
        ranged.push(e.index);
      }
      const expectedRanged = [...Array(to - from).keys()].map((k) => k + from).filter((i) => next.subarray(i * 32, i * 32 + 32).some((b) => b));
      expect(ranged).toEqual(expectedRanged);
      for (let j = 0; j < 20; j++) {
        const i = Math.floor(Math.random() * n);
        expect(await reader.digestAt(i)).toEqual(next.subarray(i * 32, i * 32 + 32));
      }
      model = next;
      basis = result.rootDigest;
      previousPages = pageDigests;
    }
  });

  it('reader loads each non-ZERO page once and never a ZERO page', async () => {
    const cs = 4096;
    const vs = cs * 8 * SLOTS_PER_PAGE;
    const patches: Array<[number, Buffer]> = [[10, randomDigest()], [11, randomDigest()], [5000, randomDigest()], [8191, randomDigest()]];
    const { result } = await build(store, vs, cs, patches);
    const counting = new CountingStore(store);
    const reader = await ImageIndexReader.open(counting, result.rootDigest);
    let zeros = 0;
    for await (const e of reader.entries()) if (e.digest.equals(ZERO_DIGEST)) zeros++;
    expect(zeros).toBe(8 * SLOTS_PER_PAGE - 4);
    expect(counting.gets.length).toBe(1 + 3); // root + pages 0, 4, 7
  });

  it('1 TiB sparse volume: incremental writes exactly the touched pages', async () => {
    const cs = 65536;
    const n = TIB / cs;
    const fullPatches: Array<[number, Buffer]> = [0, 1, 123_456, 9_000_000, n - 1].map((i) => [i, randomDigest()]);
    const full = await build(store, TIB, cs, fullPatches);
    expect(full.result).toMatchObject({ chunkCount: 2 ** 24, pageCount: 16384, pagesWritten: 4, rootBytes: 40 + 16384 * 32 });

    const indexes = new Set<number>();
    while (indexes.size < 3000) indexes.add(Math.floor(Math.random() * n));
    const patches = [...indexes].sort((a, b) => a - b).map((i): [number, Buffer] => [i, randomDigest()]);
    const touched = new Set(patches.map(([i]) => Math.floor(i / SLOTS_PER_PAGE)));
    const incr = await build(store, TIB, cs, patches, full.result.rootDigest);
    expect(incr.writer.count(BLOB_PAGE)).toBe(touched.size);
    expect(incr.writer.count(BLOB_ROOT)).toBe(1);
    const fullPages = new Set(fullPatches.map(([i]) => Math.floor(i / SLOTS_PER_PAGE)));
    const untouchedBasisPages = [...fullPages].filter((p) => !touched.has(p)).length;
    expect(incr.result).toMatchObject({ pagesWritten: touched.size, pagesShared: untouchedBasisPages });

    const reader = await ImageIndexReader.open(store, incr.result.rootDigest);
    for (const [i, d] of patches.slice(0, 200)) expect(await reader.digestAt(i)).toEqual(d);
    for (const [i, d] of fullPatches) if (!indexes.has(i)) expect(await reader.digestAt(i)).toEqual(d);
  });

  it('incremental cost does not grow with volume size (4 GiB vs 1 TiB)', async () => {
    const cs = 65536;
    const chunksIn4G = 2 ** 32 / cs;
    const basisPatches: Array<[number, Buffer]> = [];
    for (let i = 0; i < chunksIn4G; i += 16) basisPatches.push([i, randomDigest()]);
    const indexes = new Set<number>();
    while (indexes.size < 3000) indexes.add(Math.floor(Math.random() * chunksIn4G));
    const patches = [...indexes].sort((a, b) => a - b).map((i): [number, Buffer] => [i, randomDigest()]);

    const timeIncremental = async (volumeSize: number): Promise<number> => {
      const basis = await build(store, volumeSize, cs, basisPatches);
      let best = Infinity;
      for (let rep = 0; rep < 5; rep++) {
        const writer = new CountingWriter(store.openWriter());
        const t0 = process.hrtime.bigint();
        const builder = await ImageIndexBuilder.create({ store, writer, volumeSize, chunkSize: cs, basis: { rootDigest: basis.result.rootDigest } });
        for (const [i, d] of patches) await builder.set(i, d);
        const r = await builder.finish();
        best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e6);
        expect(r.pagesWritten).toBe(chunksIn4G / SLOTS_PER_PAGE);
        await writer.abort();
      }
      return best;
    };
    const t4g = await timeIncremental(2 ** 32);
    const t1t = await timeIncremental(TIB);
    console.log(`incremental of 3000 chunks: 4 GiB volume ${t4g.toFixed(1)} ms, 1 TiB volume ${t1t.toFixed(1)} ms`);
    expect(t1t).toBeLessThan(5 * t4g);
  });
});
