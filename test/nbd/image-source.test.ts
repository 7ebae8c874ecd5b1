import { describe, expect, it } from 'vitest';
import { BLOB_CHUNK, ZERO_DIGEST, type ChunkStore } from '../../appliance/store/chunk-store.js';
import { ImageIndexBuilder } from '../../appliance/store/image-index.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';
import { randomChunk, sha256 } from '../../appliance/testing/store-fixtures.js';

const CS = 4096;

/** 8 chunks: data, ZERO, data, data, ZERO, ZERO, data, 100-byte tail. */
async function image(): Promise<{ store: MemoryChunkStore; root: Buffer; vol: Buffer }> {
  const size = 7 * CS + 100;
  const vol = Buffer.alloc(size);
  const store = new MemoryChunkStore();
  const w = store.openWriter();
  const b = await ImageIndexBuilder.create({ store, writer: w, volumeSize: size, chunkSize: CS });
  for (let i = 0; i < 8; i++) {
    if (i === 1 || i === 4 || i === 5) {
      await b.set(i, ZERO_DIGEST);
      continue;
    }
    const plain = randomChunk(Math.min(CS, size - i * CS));
    plain.copy(vol, i * CS);
    await w.put(BLOB_CHUNK, sha256(plain), plain);
    await b.set(i, sha256(plain));
  }
  const { rootDigest } = await b.finish();
  await w.flush();
  return { store, root: rootDigest, vol };
}

function counting(inner: ChunkStore): ChunkStore & { gets: number } {
  const s = Object.create(inner) as ChunkStore & { gets: number };
  s.gets = 0;
  s.get = (d: Buffer) => {
    s.gets++;
    return inner.get(d);
  };
  return s;
}

describe('ImageSource', () => {
  it('reads any range as data and merged holes that reassemble the volume', async () => {
    const { store, root, vol } = await image();
    const src = await ImageSource.open(store, root);
    for (const [off, len] of [[0, vol.length], [CS - 1, 2], [3 * CS + 5, 3 * CS], [vol.length - 1, 1], [5, 0]] as const) {
      const out = Buffer.alloc(len, 0xaa);
      let pos = off;
      for (const s of await src.read(off, len)) {
        expect(s.offset).toBe(pos);
        if ('data' in s) s.data.copy(out, s.offset - off);
        else out.fill(0, s.offset - off, s.offset - off + s.hole);
        pos += 'data' in s ? s.data.length : s.hole;
      }
      expect(pos).toBe(off + len);
      expect(out.equals(vol.subarray(off, off + len))).toBe(true);
    }
    const segs = await src.read(4 * CS, 2 * CS);
    expect(segs).toEqual([{ offset: 4 * CS, hole: 2 * CS }]);
    await expect(src.read(vol.length - 1, 2)).rejects.toMatchObject({ code: 'E_CHUNK_RANGE' });
  });

  it('runs: data/zero runs merged, limited to maxRuns', async () => {
    const { store, root, vol } = await image();
    const src = await ImageSource.open(store, root);
    expect(await src.runs(0, vol.length, 100)).toEqual([
      { length: CS, zero: false },
      { length: CS, zero: true },
      { length: 2 * CS, zero: false },
      { length: 2 * CS, zero: true },
      { length: CS + 100, zero: false },
    ]);
    expect(await src.runs(CS + 7, 10, 1)).toEqual([{ length: 10, zero: true }]);
    expect(await src.runs(0, vol.length, 2)).toEqual([
      { length: CS, zero: false },
      { length: CS, zero: true },
    ]);
  });

  it('keeps recently decompressed chunks: small reads of one chunk fetch it once; the LRU is bounded', async () => {
    const { store, root } = await image();
    const c = counting(store);
    const src = await ImageSource.open(c, root, 2);
    await src.read(0, 512); // loads the index page and chunk 0
    const base = c.gets;
    for (let i = 1; i < 8; i++) await src.read(i * 512, 512);
    expect(c.gets - base).toBe(0);
    await src.read(2 * CS, 1);
    await src.read(3 * CS, 1);
    await src.read(0, 1); // evicted by the two above
    expect(c.gets - base).toBe(3);
    await src.read(3 * CS, 1); // still cached
    expect(c.gets - base).toBe(3);
  });
  it('the LRU budget can be given in bytes (whole chunks); concurrent reads of one chunk share one fetch', async () => {
    const { store, root } = await image();
    const c = counting(store);
    const src = await ImageSource.open(c, root, { cacheBytes: 3 * CS + 100 });
    expect(src.cacheCapacity).toBe(3);
    await src.read(0, 1);
    const base = c.gets;
    await Promise.all([src.read(2 * CS, 10), src.read(2 * CS + 100, 10), src.read(2 * CS + 200, 10)]);
    expect(c.gets - base).toBe(1);
  });

  it('read-ahead: a read continuing where another ended fetches the next chunks before they are asked for', async () => {
    const { store, root, vol } = await image();
    const c = counting(store);
    const src = await ImageSource.open(c, root, { readAhead: 2 });
    await src.read(0, 100); // a first read: not sequential yet, nothing fetched ahead
    await new Promise((r) => setImmediate(r));
    const afterFirst = c.gets;
    await src.read(100, CS - 100); // continues: chunks 1 (ZERO: skipped) and 2 fetched ahead
    const deadline = Date.now() + 5000;
    while (c.gets < afterFirst + 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    const fetched = c.gets;
    expect(fetched).toBe(afterFirst + 1);
    const segs = await src.read(2 * CS, CS); // chunk 2 comes from the cache (not sequential: nothing more ahead)
    expect(c.gets).toBe(fetched);
    expect((segs[0] as { data: Buffer }).data.equals(vol.subarray(2 * CS, 3 * CS))).toBe(true);
  });
});
