/**
 * FsChunkStore.getMany without read workers (the NBD read path by default):
 * blobs that lie back to back in a pack are read with one pread per run
 * (blob-runs.ts), still decoded and re-hashed one by one; what callers see is
 * what get() gives — bytes, and for a damaged or missing blob the same error.
 */
import { describe, expect, it, vi } from 'vitest';
import { isBlocksnapError } from '../../proto/errors.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { MAX_RUN_BYTES } from '../../appliance/store/blob-runs.js';
import { CODEC_NONE, CODEC_ZSTD } from '../../appliance/store/pack-format.js';
import { makeBlob, randomChunk, type TestBlob } from '../../appliance/testing/store-fixtures.js';
import { expectDamagedBlobReported, mixedBlobs, storedImage, storesEach } from '../support/stored-blobs.js';

const storeWith = storesEach();

describe('FsChunkStore.getMany on the main thread', () => {
  it('reads each run of adjacent blobs with one pread and returns what get returns, plain and zstd, across packs', async () => {
    const blobs = mixedBlobs();
    const { store } = await storeWith(blobs);
    expect(new Set(blobs.map((b) => store.locate(b.digest)!.codec))).toEqual(new Set([CODEC_NONE, CODEC_ZSTD]));
    const packs = new Set(blobs.map((b) => store.locate(b.digest)!.pack));
    expect(packs.size).toBeGreaterThan(1);
    const reads = vi.spyOn(store, 'readStoredv');
    const get = vi.spyOn(store, 'get');
    // Shuffled: the store sorts each pack's blobs by offset into runs.
    const order = [...blobs.keys()].sort((a, b) => ((a * 7) % 24) - ((b * 7) % 24));
    const got = await store.getMany(order.map((i) => blobs[i]!.digest));
    order.forEach((i, k) => expect(got[k]!.equals(blobs[i]!.plain)).toBe(true));
    expect(get).not.toHaveBeenCalled();
    // Runs of adjacent blobs, each cut at MAX_RUN_BYTES: one read per run, not one per blob.
    let runs = 0;
    for (const pack of packs) {
      const locs = blobs.map((b) => store.locate(b.digest)!).filter((l) => l.pack === pack).sort((a, b) => a.offset - b.offset);
      for (let i = 0, start = -1, end = -1; i < locs.length; i++) {
        const l = locs[i]!;
        if (l.offset !== end || l.offset + l.storedLength - start > MAX_RUN_BYTES) {
          runs++;
          start = l.offset;
        }
        end = l.offset + l.storedLength;
      }
    }
    expect(runs).toBeLessThan(blobs.length / 2);
    expect(reads).toHaveBeenCalledTimes(runs);
    // A returned blob pins at most one run's buffer (ImageSource caches these views).
    for (const g of got) expect(g.buffer.byteLength).toBeLessThanOrEqual(Math.max(MAX_RUN_BYTES, g.length));
  });

  it('a blob damaged inside a run fails as get fails (E_STORE_CORRUPT naming pack and digest); its neighbours still read', async () => {
    const blobs: [TestBlob, TestBlob, TestBlob] = [makeBlob(randomChunk(65536)), makeBlob(randomChunk(65536)), makeBlob(randomChunk(65536))];
    const { store, dir } = await storeWith(blobs);
    await expectDamagedBlobReported(store, dir, blobs);
    const missing = await store.getMany([blobs[0]!.digest, Buffer.alloc(32, 7)]).catch((e: unknown) => e);
    expect(isBlocksnapError(missing, 'E_NOT_FOUND')).toBe(true);
  });

  it('ImageSource: reads starting and ending at every chunk boundary (±1 byte) give the volume\'s bytes', async () => {
    const CS = 65536;
    const n = 12;
    const { store, vol, rootDigest } = await storedImage(storeWith, n, CS, (i) => i % 5 === 3); // some ZERO chunks
    // No cache: every read goes to the store, so each one exercises the runs.
    const source = await ImageSource.open(store, rootDigest, { cacheChunks: 0 });
    const check = async (off: number, len: number): Promise<void> => {
      const out = Buffer.alloc(len, 0xaa);
      for (const seg of await source.read(off, len)) {
        if ('data' in seg) seg.data.copy(out, seg.offset - off);
        else out.fill(0, seg.offset - off, seg.offset - off + seg.hole);
      }
      expect(out.equals(vol.subarray(off, off + len)), `read of ${len} at ${off}`).toBe(true);
    };
    for (let i = 0; i <= n; i++) {
      for (const d of [-1, 0, 1]) {
        const off = i * CS + d;
        if (off < 0 || off >= vol.length) continue;
        for (const len of [1, CS - 1, CS, CS + 1, 4 * CS + 1]) if (off + len <= vol.length) await check(off, len);
      }
    }
    await check(0, vol.length);
    // Concurrent reads of overlapping ranges (nbdcopy's 4 connections × 64 requests) stay byte-equal.
    await Promise.all(Array.from({ length: 32 }, (_, k) => check((k * 37_000) % (vol.length - 4 * CS), 4 * CS)));
  });
});
