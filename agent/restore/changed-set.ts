import BitSet from 'bitset';
import { DIGEST_BYTES } from '../../proto/shared/image-root.js';

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
  const A = words32(a, chunkCount);
  const B = words32(b, chunkCount);
  // Eight u32 compares per digest in one loop: a native compare call per digest costs far more
  // (measured: 7.4 s vs well under a second for 16 Mi digests on a loaded host).
  for (let i = 0, w = 0; i < chunkCount; i++, w += 8) {
    if (A[w] !== B[w] || A[w + 1] !== B[w + 1] || A[w + 2] !== B[w + 2] || A[w + 3] !== B[w + 3] ||
      A[w + 4] !== B[w + 4] || A[w + 5] !== B[w + 5] || A[w + 6] !== B[w + 6] || A[w + 7] !== B[w + 7]) s.set(i, 1);
  }
  return s;
}

/** A u32 view of chunkCount digests (copied when the bytes are not 4-byte aligned). */
function words32(m: Uint8Array, chunkCount: number): Uint32Array {
  const bytes = chunkCount * DIGEST_BYTES;
  if (m.length < bytes) throw new RangeError(`digest map of ${m.length} bytes is shorter than ${chunkCount} digests`);
  if (m.byteOffset % 4 === 0) return new Uint32Array(m.buffer, m.byteOffset, bytes / 4);
  return new Uint32Array(m.slice(0, bytes).buffer);
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
