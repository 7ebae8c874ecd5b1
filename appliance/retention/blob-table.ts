/**
 * Dense integer ids for the blobs of the index at the start of a GC (the
 * mark set is a bitmap over them, MarkBits below, DESIGN.md §12.2): id = position in one
 * synchronous scan of the blob index. Lookup digest → id is an
 * open-addressing hash table in typed arrays (the digest's first 4 bytes are
 * the hash: SHA-256 is uniform), 32 + 4 + 4 + 8 bytes per blob, so 16 M blobs
 * (1 TiB at 64 KiB chunks) cost ~0.8 GiB and 65 536 (4 GiB) ~3 MiB.
 */
export class BlobTable {
  /** digest of blob i at [32 i, 32 i + 32). */
  private digests: Buffer;
  private packOfId: Uint32Array;
  private stored: Uint32Array;
  private slots: Int32Array = new Int32Array(0);
  private mask = 0;
  readonly packs: string[] = [];
  private readonly packIndex = new Map<string, number>();
  count = 0;

  constructor(expected = 1024) {
    this.digests = Buffer.alloc(32 * Math.max(16, expected));
    this.packOfId = new Uint32Array(Math.max(16, expected));
    this.stored = new Uint32Array(Math.max(16, expected));
  }

  add(digest: Buffer, pack: string, storedLength: number): void {
    if (this.count === this.packOfId.length) this.grow();
    let p = this.packIndex.get(pack);
    if (p === undefined) {
      p = this.packs.length;
      this.packs.push(pack);
      this.packIndex.set(pack, p);
    }
    digest.copy(this.digests, this.count * 32);
    this.packOfId[this.count] = p;
    this.stored[this.count] = storedLength;
    this.count++;
  }

  /** Builds the lookup table; call once after the last `add`. */
  seal(): void {
    let cap = 16;
    while (cap < this.count * 2) cap *= 2;
    this.slots = new Int32Array(cap);
    this.mask = cap - 1;
    for (let id = 0; id < this.count; id++) {
      let s = this.digests.readUInt32LE(id * 32) & this.mask;
      while (this.slots[s] !== 0) s = (s + 1) & this.mask;
      this.slots[s] = id + 1;
    }
  }

  /** The id of `digest`, or −1 if the index did not hold it at the scan. */
  idOf(digest: Buffer, offset = 0): number {
    let s = digest.readUInt32LE(offset) & this.mask;
    for (;;) {
      const v = this.slots[s]!;
      if (v === 0) return -1;
      const id = v - 1;
      if (this.digests.compare(digest, offset, offset + 32, id * 32, id * 32 + 32) === 0) return id;
      s = (s + 1) & this.mask;
    }
  }

  digest(id: number): Buffer {
    return this.digests.subarray(id * 32, id * 32 + 32);
  }

  packOf(id: number): string {
    return this.packs[this.packOfId[id]!]!;
  }

  packNumberOf(id: number): number {
    return this.packOfId[id]!;
  }

  storedLength(id: number): number {
    return this.stored[id]!;
  }

  private grow(): void {
    const n = this.packOfId.length * 2;
    const d = Buffer.alloc(32 * n);
    this.digests.copy(d);
    this.digests = d;
    const p = new Uint32Array(n);
    p.set(this.packOfId);
    this.packOfId = p;
    const st = new Uint32Array(n);
    st.set(this.stored);
    this.stored = st;
  }
}

/**
 * The mark set over the dense ids of a BlobTable: one bit per blob in a
 * Uint32Array sized at T0 (the ids are known then). Measured against the
 * project's `bitset` package (scripts/bench-gc.ts, README Benchmarks): for
 * 16 M blobs, setting every 3rd id in random order took 1.35 s with bitset
 * (0.75 s grown to size first) and 0.15 s here, at the same 2 MiB; GC needs
 * only set and test, none of bitset's algebra, so the plain bitmap is used.
 */
export class MarkBits {
  private readonly words: Uint32Array;

  constructor(readonly size: number) {
    this.words = new Uint32Array(Math.ceil(Math.max(1, size) / 32));
  }

  set(id: number): void {
    this.words[id >>> 5]! |= 1 << (id & 31);
  }

  has(id: number): boolean {
    return (this.words[id >>> 5]! & (1 << (id & 31))) !== 0;
  }

  /** The ids set, in increasing order. */
  *ids(): Generator<number> {
    for (let w = 0; w < this.words.length; w++) {
      let bits = this.words[w]!;
      while (bits !== 0) {
        const low = bits & -bits;
        yield w * 32 + (31 - Math.clz32(low));
        bits ^= low;
      }
    }
  }
}
