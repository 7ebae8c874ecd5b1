/**
 * FsChunkStore.getMany (the NBD read path): blobs read, decoded and
 * re-hashed in worker threads give exactly what get() gives, a damaged blob
 * is still E_STORE_CORRUPT naming pack and digest, and the image index
 * reader keeps several pages (readers walking different regions at once).
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { isBlocksnapError } from '../../proto/errors.js';
import { BLOB_CHUNK, type ChunkStore } from '../../appliance/store/chunk-store.js';
import { FsChunkStore } from '../../appliance/store/fs-chunk-store.js';
import { ImageIndexBuilder, ImageIndexReader } from '../../appliance/store/image-index.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { CODEC_NONE, CODEC_ZSTD, packRelPath } from '../../appliance/store/pack-format.js';
import { compressibleChunk, makeBlob, randomChunk, TempDirs, type TestBlob } from '../../appliance/testing/store-fixtures.js';
import { waitFor } from '../support/wait-for.js';

const dirs = new TempDirs();
const stores: FsChunkStore[] = [];
afterEach(async () => {
  await Promise.all(stores.splice(0).map((s) => s.close()));
  await dirs.cleanup();
});

async function storeWith(blobs: TestBlob[]): Promise<{ store: FsChunkStore; dir: string }> {
  const dir = await dirs.make();
  const store = await FsChunkStore.open(dir, { targetPackSize: 600_000, readWorkers: 2 });
  stores.push(store);
  const w = store.openWriter();
  for (const b of blobs) await w.put(BLOB_CHUNK, b.digest, b.plain);
  await w.flush();
  return { store, dir };
}

async function workersUp(store: FsChunkStore): Promise<void> {
  await waitFor('the blob read workers', async () => {
    await store.getMany([]);
    return store.readWorkersReady;
  }, { timeoutMs: 60_000 });
}

describe('FsChunkStore.getMany', () => {
  it('returns what get returns, plain and zstd blobs back to back and across packs, read in the workers', async () => {
    const blobs: TestBlob[] = [];
    for (let i = 0; i < 24; i++) blobs.push(makeBlob(i % 3 === 1 ? compressibleChunk(65536) : randomChunk(i === 5 ? 1000 : 65536)));
    const { store } = await storeWith(blobs);
    const codecs = new Set(blobs.map((b) => store.locate(b.digest)!.codec));
    expect(codecs).toEqual(new Set([CODEC_NONE, CODEC_ZSTD]));
    expect(new Set(blobs.map((b) => store.locate(b.digest)!.pack)).size).toBeGreaterThan(1);
    await workersUp(store);
    const get = vi.spyOn(store, 'get');
    const order = [...blobs.keys()].sort((a, b) => ((a * 7) % 24) - ((b * 7) % 24));
    const got = await store.getMany(order.map((i) => blobs[i]!.digest));
    order.forEach((i, k) => expect(got[k]!.equals(blobs[i]!.plain)).toBe(true));
    expect(get).not.toHaveBeenCalled();
  });

  it('a blob damaged on disk fails with E_STORE_CORRUPT naming pack and digest; the others of its pack still read', async () => {
    const blobs = [makeBlob(randomChunk(65536)), makeBlob(randomChunk(65536)), makeBlob(randomChunk(65536))];
    const { store, dir } = await storeWith(blobs);
    await workersUp(store);
    const loc = store.locate(blobs[1]!.digest)!;
    const fh = await open(join(dir, 'packs', packRelPath(loc.pack)), 'r+');
    await fh.write(Buffer.from([0x5a]), 0, 1, loc.offset + 100);
    await fh.close();
    const err = await store.getMany(blobs.map((b) => b.digest)).catch((e: unknown) => e);
    expect(isBlocksnapError(err, 'E_STORE_CORRUPT')).toBe(true);
    expect((err as Error).message).toContain(loc.pack);
    expect((err as Error).message).toContain(blobs[1]!.digest.toString('hex'));
    const [a, c] = await store.getMany([blobs[0]!.digest, blobs[2]!.digest]);
    expect(a!.equals(blobs[0]!.plain) && c!.equals(blobs[2]!.plain)).toBe(true);
  });
});

describe('ImageSource over the read workers', () => {
  it('unaligned reads across chunks, holes and packs give the volume\'s bytes', async () => {
    const CS = 65536;
    const n = 20;
    const vol = Buffer.alloc(n * CS);
    const blobs: TestBlob[] = [];
    for (let i = 0; i < n; i++) {
      if (i % 7 === 3) continue; // ZERO chunks
      const plain = i % 2 ? compressibleChunk(CS) : randomChunk(CS);
      plain.copy(vol, i * CS);
      blobs.push(makeBlob(plain));
    }
    const { store } = await storeWith(blobs);
    const w = store.openWriter();
    const b = await ImageIndexBuilder.create({ store, writer: w, volumeSize: vol.length, chunkSize: CS });
    for (let i = 0, k = 0; i < n; i++) await b.set(i, i % 7 === 3 ? Buffer.alloc(32) : blobs[k++]!.digest);
    const { rootDigest } = await b.finish();
    await w.flush();
    await workersUp(store);
    const get = vi.spyOn(store, 'get');
    const source = await ImageSource.open(store, rootDigest, { cacheChunks: 2 });
    for (const [off, len] of [[0, vol.length], [CS - 1, 3 * CS + 2], [5 * CS + 100, 7 * CS], [vol.length - 10, 10]] as const) {
      const out = Buffer.alloc(len);
      for (const seg of await source.read(off, len)) if ('data' in seg) seg.data.copy(out, seg.offset - off);
      expect(out.equals(vol.subarray(off, off + len))).toBe(true);
    }
    // Chunks came from the workers: get only loaded the index root and its one page.
    expect(get.mock.calls.length).toBeLessThanOrEqual(2);
  });
});

describe('ImageIndexReader page cache', () => {
  it('readers alternating between two pages load each page once (one cached page reloaded it every time)', async () => {
    const { store } = await storeWith([]);
    const w = store.openWriter();
    const CS = 4096;
    const chunks = 2048 + 10; // pages 0, 1 and 2 (1024 slots each)
    const b = await ImageIndexBuilder.create({ store, writer: w, volumeSize: chunks * CS, chunkSize: CS });
    const digests: Buffer[] = [];
    for (let i = 0; i < chunks; i++) {
      const blob = makeBlob(randomChunk(64));
      digests.push(blob.digest);
      await b.set(i, blob.digest);
    }
    const { rootDigest } = await b.finish();
    await w.flush();
    let gets = 0;
    const counting = Object.create(store, { get: { value: (d: Buffer) => { gets++; return store.get(d); } } }) as ChunkStore;
    const reader = await ImageIndexReader.open(counting, rootDigest);
    const before = gets;
    for (let k = 0; k < 50; k++) {
      expect((await reader.digestAt(k)).equals(digests[k]!)).toBe(true);
      expect((await reader.digestAt(1024 + k)).equals(digests[1024 + k]!)).toBe(true);
      expect((await reader.digestAt(2048 + (k % 10))).equals(digests[2048 + (k % 10)]!)).toBe(true);
    }
    expect(gets - before).toBe(3);
  });
});
