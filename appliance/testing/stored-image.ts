/**
 * Test helpers for images in a real chunk store: a random image written as
 * chunks with its index (what the NBD, mount and restore tests serve), and a
 * fingerprint of a store directory (how a test proves that nothing done on a
 * mount changed the image's stored chunks).
 */
import { createHash } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { BLOB_CHUNK, ZERO_DIGEST, type ChunkStore } from '../store/chunk-store.js';
import { ImageIndexBuilder } from '../store/image-index.js';
import { randomChunk, sha256 } from './store-fixtures.js';

export interface StoredImage {
  rootDigest: Buffer;
  /** The image's bytes (ZERO chunks as zeros). */
  volume: Buffer;
}

/** A random image of `size` bytes stored in `store`: chunk i is a ZERO chunk where `zeroAt(i)`, else random. */
export async function storeRandomImage(
  store: ChunkStore,
  o: { size: number; chunkSize: number; zeroAt: (index: number) => boolean },
): Promise<StoredImage> {
  const volume = Buffer.alloc(o.size);
  const writer = store.openWriter();
  const builder = await ImageIndexBuilder.create({ store, writer, volumeSize: o.size, chunkSize: o.chunkSize });
  const chunks = Math.ceil(o.size / o.chunkSize);
  for (let i = 0; i < chunks; i++) {
    if (o.zeroAt(i)) {
      await builder.set(i, ZERO_DIGEST);
      continue;
    }
    const plain = randomChunk(Math.min(o.chunkSize, o.size - i * o.chunkSize));
    plain.copy(volume, i * o.chunkSize);
    await writer.put(BLOB_CHUNK, sha256(plain), plain);
    await builder.set(i, sha256(plain));
  }
  const rootDigest = (await builder.finish()).rootDigest;
  await writer.flush();
  return { rootDigest, volume };
}

/** SHA-256 over the name and bytes of every file under `dir`, in name order. */
export async function storeFingerprint(dir: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (d: string): Promise<void> => {
    for (const e of (await readdir(d, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else h.update(p).update(await readFile(p));
    }
  };
  await walk(dir);
  return h.digest('hex');
}
