/**
 * The set of blob digests one blob writer de-duplicated against the index
 * (DESIGN.md §12.3): the sweep keeps every blob any writer alive since its
 * mark began may have hit. A Bloom filter, because a full of a large
 * unchanged volume is one hit per chunk (16 M for 1 TiB at 64 KiB) and an
 * exact set would cost ~40 bytes each: here ~1.2 bytes per hit at a 1 %
 * false-positive rate. A false positive only keeps a dead blob until the
 * next GC; there are no false negatives, which is what safety needs.
 *
 * Digests are SHA-256 outputs, already uniform: the k bit positions are
 * taken from the digest's own bytes (no extra hashing). The filter grows
 * by tiers (each twice as large as the last), so a writer that hits little
 * costs 8 KiB and one that hits a lot stays near 1 %.
 */
const K = 7;
const BITS_PER_ENTRY = 10; // ≈ 1 % at k = 7
const FIRST_CAPACITY = 1 << 13;

interface Tier {
  bits: Uint32Array;
  mask: number; // bit count − 1 (a power of two)
  capacity: number;
  count: number;
}

function newTier(capacity: number): Tier {
  let nbits = 1;
  while (nbits < capacity * BITS_PER_ENTRY) nbits *= 2;
  return { bits: new Uint32Array(nbits / 32), mask: nbits - 1, capacity, count: 0 };
}

/** The k-th bit position: two 32-bit words of the digest combined (double hashing). */
function position(digest: Uint8Array, i: number, mask: number): number {
  const h1 = (digest[0]! | (digest[1]! << 8) | (digest[2]! << 16) | (digest[3]! << 24)) >>> 0;
  const h2 = (digest[4]! | (digest[5]! << 8) | (digest[6]! << 16) | (digest[7]! << 24)) >>> 0;
  return ((h1 + Math.imul(i, h2 | 1)) >>> 0) & mask;
}

export class HitFilter {
  private readonly tiers: Tier[] = [newTier(FIRST_CAPACITY)];
  private n = 0;

  /** Entries added (duplicates counted). */
  get size(): number {
    return this.n;
  }

  /** Bytes held by the bit arrays. */
  get bytes(): number {
    return this.tiers.reduce((s, t) => s + t.bits.byteLength, 0);
  }

  add(digest: Uint8Array): void {
    let t = this.tiers[this.tiers.length - 1]!;
    if (t.count >= t.capacity) {
      t = newTier(t.capacity * 2);
      this.tiers.push(t);
    }
    for (let i = 0; i < K; i++) {
      const p = position(digest, i, t.mask);
      t.bits[p >>> 5]! |= 1 << (p & 31);
    }
    t.count++;
    this.n++;
  }

  /** False only if `digest` was never added. */
  mayHave(digest: Uint8Array): boolean {
    for (const t of this.tiers) {
      let all = true;
      for (let i = 0; i < K && all; i++) {
        const p = position(digest, i, t.mask);
        all = (t.bits[p >>> 5]! & (1 << (p & 31))) !== 0;
      }
      if (all) return true;
    }
    return false;
  }
}
