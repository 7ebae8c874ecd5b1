import BitSet from 'bitset';
import { DIGEST_BYTES, SLOTS_PER_PAGE } from '../../proto/shared/image-root.js';

/**
 * Sets of chunk indexes for a changed-only restore (DESIGN.md §4.6), with the
 * project's `bitset` package: here is set algebra over whole sets (a few
 * unions per restore), not the tracker's hot path, where ChangeBitmap's
 * fixed Uint32Array stays (DESIGN.md §7). Measured for 16 Mi bits (1 TiB at
 * 64 KiB): see README "Benchmarks" (scripts/bench-restore.ts prints it).
 *
 * Both representations are 32-bit words, bit b of word w = chunk 32w+b, so a
 * tracker bitmap becomes a BitSet by copying its words.
 */
export type ChunkSet = BitSet;

/** An empty set sized for `chunkCount` chunks (sized up front: set() then never grows the array). */
export function emptySet(chunkCount: number): ChunkSet {
  const s = new BitSet();
  s.data = new Array<number>(Math.ceil(chunkCount / 32) + 1).fill(0);
  s._ = 0;
  return s;
}

/** The chunks a tracker generation marked (ChangeBitmap.words). */
export function setOfWords(words: Uint32Array): ChunkSet {
  const s = new BitSet();
  const data = new Array<number>(words.length + 1);
  for (let i = 0; i < words.length; i++) data[i] = words[i]! | 0;
  data[words.length] = 0;
  s.data = data;
  s._ = 0;
  return s;
}

/** Chunks whose 32-byte digests differ between two maps of the same geometry. */
export function digestDiffSet(a: Uint8Array, b: Uint8Array, chunkCount: number): ChunkSet {
  const s = emptySet(chunkCount);
  const A = Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  const B = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  // Page by page first: maps of related images share most pages, and one compare of 32 KiB
  // costs far less than 1024 compares of 32 bytes.
  for (let p = 0; p < chunkCount; p += SLOTS_PER_PAGE) {
    const end = Math.min(chunkCount, p + SLOTS_PER_PAGE);
    if (A.compare(B, p * DIGEST_BYTES, end * DIGEST_BYTES, p * DIGEST_BYTES, end * DIGEST_BYTES) === 0) continue;
    for (let i = p; i < end; i++) {
      const off = i * DIGEST_BYTES;
      if (A.compare(B, off, off + DIGEST_BYTES, off, off + DIGEST_BYTES) !== 0) s.set(i, 1);
    }
  }
  return s;
}

/** The union of the sets (a new set). */
export function unionOf(first: ChunkSet, ...rest: ChunkSet[]): ChunkSet {
  let u = first.clone();
  for (const s of rest) u = u.or(s);
  return u;
}

/** Set indexes below `limit`, increasing. */
export function* indexesOf(s: ChunkSet, limit: number): Generator<number> {
  const d = s.data;
  for (let w = 0; w < d.length; w++) {
    let word = d[w]! >>> 0;
    while (word !== 0) {
      const bit = 31 - Math.clz32(word & -word);
      const i = w * 32 + bit;
      if (i >= limit) return;
      yield i;
      word &= word - 1;
    }
  }
}

export function countOf(s: ChunkSet): number {
  return s.cardinality();
}
