/**
 * The set-up the chunk store's read-path tests share (getMany on the main
 * thread and in read workers, ImageSource over them): filesystem stores
 * holding given blobs, closed and removed after each test; a mixed blob set
 * (plain and zstd, several packs); a blob damaged on disk and what getMany
 * must then say; an image of chunks with zero chunks among them.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, expect } from 'vitest';
import { isBlocksnapError } from '../../proto/errors.js';
import { BLOB_CHUNK, type BlobLocation } from '../../appliance/store/chunk-store.js';
import { FsChunkStore } from '../../appliance/store/fs-chunk-store.js';
import { ImageIndexBuilder } from '../../appliance/store/image-index.js';
import { packRelPath } from '../../appliance/store/pack-format.js';
import { compressibleChunk, makeBlob, randomChunk, TempDirs, type TestBlob } from '../../appliance/testing/store-fixtures.js';

/** Small packs, so a few dozen 64 KiB blobs span several. */
const TARGET_PACK_SIZE = 600_000;

/**
 * `storeWith(blobs)`: a new FsChunkStore in a temp directory holding `blobs`
 * (flushed). Registers an afterEach of the calling file that closes every
 * store made and removes its directory, also when the test failed.
 */
export function storesEach(opts: { readWorkers?: number } = {}): (blobs: TestBlob[]) => Promise<{ store: FsChunkStore; dir: string }> {
  const dirs = new TempDirs();
  const stores: FsChunkStore[] = [];
  afterEach(async () => {
    await Promise.all(stores.splice(0).map((s) => s.close()));
    await dirs.cleanup();
  });
  return async (blobs) => {
    const dir = await dirs.make();
    const store = await FsChunkStore.open(dir, { targetPackSize: TARGET_PACK_SIZE, ...opts });
    stores.push(store);
    const w = store.openWriter();
    for (const b of blobs) await w.put(BLOB_CHUNK, b.digest, b.plain);
    await w.flush();
    return { store, dir };
  };
}

/** 24 blobs: every third compressible (stored zstd), the others random (stored plain), one short; across packs when stored. */
export function mixedBlobs(): TestBlob[] {
  return Array.from({ length: 24 }, (_, i) => makeBlob(i % 3 === 1 ? compressibleChunk(65536) : randomChunk(i === 5 ? 1000 : 65536)));
}

/**
 * Flips one byte inside `digest`'s stored bytes in its pack file; returns where the blob is. The byte is
 * inverted, not overwritten with a constant: in random data a constant is already there once in 256 runs,
 * and the "damage" then changed nothing (a CI run failed so).
 */
export async function damageBlob(store: FsChunkStore, dir: string, digest: Buffer): Promise<BlobLocation> {
  const loc = store.locate(digest)!;
  const fh = await open(join(dir, 'packs', packRelPath(loc.pack)), 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, loc.offset + 100);
    b[0] = b[0]! ^ 0xff;
    await fh.write(b, 0, 1, loc.offset + 100);
  } finally {
    await fh.close();
  }
  return loc;
}

/**
 * Damages the middle one of three stored blobs; getMany of all three must fail
 * E_STORE_CORRUPT naming its pack and digest, and the other two still read.
 */
export async function expectDamagedBlobReported(store: FsChunkStore, dir: string, blobs: [TestBlob, TestBlob, TestBlob]): Promise<void> {
  const loc = await damageBlob(store, dir, blobs[1].digest);
  const err = await store.getMany(blobs.map((b) => b.digest)).catch((e: unknown) => e);
  expect(isBlocksnapError(err, 'E_STORE_CORRUPT')).toBe(true);
  expect((err as Error).message).toContain(loc.pack);
  expect((err as Error).message).toContain(blobs[1].digest.toString('hex'));
  const [a, c] = await store.getMany([blobs[0].digest, blobs[2].digest]);
  expect(a!.equals(blobs[0].plain) && c!.equals(blobs[2].plain)).toBe(true);
}

/**
 * A volume of `n` chunks of `chunkSize` (chunk i zero where `isZero(i)`,
 * else alternately random and compressible), stored in a new store from
 * `storeWith` with its image index. Returns the volume's bytes and the index root.
 */
export async function storedImage(
  storeWith: (blobs: TestBlob[]) => Promise<{ store: FsChunkStore }>, n: number, chunkSize: number, isZero: (i: number) => boolean,
): Promise<{ store: FsChunkStore; vol: Buffer; rootDigest: Buffer }> {
  const vol = Buffer.alloc(n * chunkSize);
  const blobs: TestBlob[] = [];
  for (let i = 0; i < n; i++) {
    if (isZero(i)) continue;
    const plain = i % 2 ? compressibleChunk(chunkSize) : randomChunk(chunkSize);
    plain.copy(vol, i * chunkSize);
    blobs.push(makeBlob(plain));
  }
  const { store } = await storeWith(blobs);
  const w = store.openWriter();
  const b = await ImageIndexBuilder.create({ store, writer: w, volumeSize: vol.length, chunkSize });
  for (let i = 0, k = 0; i < n; i++) await b.set(i, isZero(i) ? Buffer.alloc(32) : blobs[k++]!.digest);
  const { rootDigest } = await b.finish();
  await w.flush();
  return { store, vol, rootDigest };
}
