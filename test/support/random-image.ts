/**
 * Deterministic test images for the reader pipeline: a file of `volumeSize`
 * bytes cut into chunks of one of these kinds (the last chunk may be short):
 * - zero:   all zero, left as a hole (the file is sparse there)
 * - random: incompressible bytes (AES-CTR keystream of seed and index)
 * - text:   compressible word soup
 * - mixed:  8 KiB pages, each random or text (like a database file)
 * - repeat: one fixed pattern shared by every repeat chunk (same digest)
 * Same seed, same bytes: tests recompute expectations from the file itself.
 */
import { createCipheriv, createHash } from 'node:crypto';
import { open } from 'node:fs/promises';

export type ChunkKind = 'zero' | 'random' | 'text' | 'mixed' | 'repeat';

export interface ImageOptions {
  chunkSize: number;
  volumeSize: number;
  seed?: number;
  /** Kind of chunk i; default `mixedKinds(seed)`. */
  kindOf?: (index: number) => ChunkKind;
}

export interface ImageInfo {
  path: string;
  chunkSize: number;
  volumeSize: number;
  chunkCount: number;
  kinds: ChunkKind[];
}

const WORDS = ('select from where insert update delete tuple page heap index vacuum commit ' +
  'checkpoint relation buffer block chunk backup snapshot volume digest table row column ' +
  'lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor 0 1 2 3 4 5 6 7 8 9')
  .split(' ').map((w) => Buffer.from(w + ' '));

/** Deterministic pseudo-random bytes for (seed, stream, index). */
export function keystream(seed: number, stream: number, index: number, length: number): Buffer {
  const key = createHash('sha256').update(`blocksnap-test-image:${seed}`).digest().subarray(0, 16);
  const iv = Buffer.alloc(16);
  iv.writeUInt32LE(stream, 0);
  iv.writeDoubleLE(index, 4);
  return createCipheriv('aes-128-ctr', key, iv).update(Buffer.alloc(length));
}

function textInto(out: Buffer, start: number, end: number, rnd: Buffer): void {
  let p = start;
  for (let r = 0; p < end; r = (r + 1) % rnd.length) {
    const w = WORDS[rnd[r]! % WORDS.length]!;
    p += w.copy(out, p, 0, Math.min(w.length, end - p));
  }
}

/** Bytes of a chunk of the given kind (length = real chunk length). */
export function chunkContent(kind: ChunkKind, seed: number, index: number, length: number): Buffer {
  switch (kind) {
    case 'zero':
      return Buffer.alloc(length);
    case 'random':
      return keystream(seed, 1, index, length);
    case 'repeat':
      return keystream(seed, 2, 0, length);
    case 'text': {
      const out = Buffer.allocUnsafe(length);
      textInto(out, 0, length, keystream(seed, 3, index, 4096));
      return out;
    }
    case 'mixed': {
      const out = keystream(seed, 4, index, length);
      const coin = keystream(seed, 5, index, Math.ceil(length / 8192));
      for (let p = 0, page = 0; p < length; p += 8192, page++) {
        if (coin[page]! & 1) textInto(out, p, Math.min(length, p + 8192), Buffer.from(out.subarray(p, p + 1024)));
      }
      return out;
    }
  }
}

/** A kind chooser: about 25% zero, 35% random, 20% text, 10% mixed, 10% repeat. */
export function mixedKinds(seed: number): (index: number) => ChunkKind {
  return (index) => {
    const v = keystream(seed, 6, index, 1)[0]! % 20;
    return v < 5 ? 'zero' : v < 12 ? 'random' : v < 16 ? 'text' : v < 18 ? 'mixed' : 'repeat';
  };
}

export async function writeTestImage(path: string, opts: ImageOptions): Promise<ImageInfo> {
  const { chunkSize, volumeSize } = opts;
  const seed = opts.seed ?? 1;
  const kindOf = opts.kindOf ?? mixedKinds(seed);
  const chunkCount = Math.ceil(volumeSize / chunkSize);
  const kinds: ChunkKind[] = [];
  const fh = await open(path, 'w');
  try {
    for (let i = 0; i < chunkCount; i++) {
      const kind = kindOf(i);
      kinds.push(kind);
      if (kind === 'zero') continue;
      const len = Math.min(chunkSize, volumeSize - i * chunkSize);
      await fh.write(chunkContent(kind, seed, i, len), 0, len, i * chunkSize);
    }
    await fh.truncate(volumeSize);
  } finally {
    await fh.close();
  }
  return { path, chunkSize, volumeSize, chunkCount, kinds };
}

/** Overwrites chunk `index` of an image with `data` (its real length). */
export async function writeChunk(path: string, chunkSize: number, index: number, data: Buffer): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(data, 0, data.length, index * chunkSize);
  } finally {
    await fh.close();
  }
}
