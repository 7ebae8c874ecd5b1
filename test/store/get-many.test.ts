/**
 * FsChunkStore.getMany (the NBD read path): blobs read, decoded and
 * re-hashed in worker threads give exactly what get() gives, a damaged blob
 * is still E_STORE_CORRUPT naming pack and digest, and the image index
 * reader keeps several pages (readers walking different regions at once).
 */
import { describe, expect, it, vi } from 'vitest';
import type { ChunkStore } from '../../appliance/store/chunk-store.js';
import type { FsChunkStore } from '../../appliance/store/fs-chunk-store.js';
import { ImageIndexBuilder, ImageIndexReader } from '../../appliance/store/image-index.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { CODEC_NONE, CODEC_ZSTD } from '../../appliance/store/pack-format.js';
import { makeBlob, randomChunk, type TestBlob } from '../../appliance/testing/store-fixtures.js';
import { expectDamagedBlobReported, mixedBlobs, storedImage, storesEach } from '../support/stored-blobs.js';
import { waitFor } from '../support/wait-for.js';

const storeWith = storesEach({ readWorkers: 2 });

async function workersUp(store: FsChunkStore): Promise<void> {
  await waitFor('the blob read workers', async () => {
    await store.getMany([]);
    return store.readWorkersReady;
  }, { timeoutMs: 60_000 });
}

describe('FsChunkStore.getMany', () => {
  it('returns what get returns, plain and zstd blobs back to back and across packs, read in the workers', async () => {
    const blobs = mixedBlobs();
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
    const blobs: [TestBlob, TestBlob, TestBlob] = [makeBlob(randomChunk(65536)), makeBlob(randomChunk(65536)), makeBlob(randomChunk(65536))];
    const { store, dir } = await storeWith(blobs);
    await workersUp(store);
    await expectDamagedBlobReported(store, dir, blobs);
  });
});

describe('ImageSource over the read workers', () => {
  it('unaligned reads across chunks, holes and packs give the volume\'s bytes', async () => {
    const CS = 65536;
    const n = 20;
    const { store, vol, rootDigest } = await storedImage(storeWith, n, CS, (i) => i % 7 === 3); // some ZERO chunks
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
