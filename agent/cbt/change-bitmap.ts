import { BlocksnapError } from '../../proto/errors.js';
import { chunkCountOf, isValidTrackingGranularity, SECTOR_SIZE } from '../../proto/shared/volume-geometry.js';

/**
 * One bit per chunk of a device: "this chunk may have changed".
 *
 * Storage is a plain fixed-size Uint32Array, not the `bitset` package:
 * - the device size, hence the bit count, is known when tracking starts, so
 *   the array never grows; `bitset` keeps a growable JS Array of words with an
 *   infinite-complement sign word and grows by push(), which allocates;
 * - the tracer hot path (`setSectors`, called for every traced bio) must not
 *   allocate: it touches at most two partial words and fills whole words
 *   in between;
 * - the persisted bitmap (bitmap-file.ts) is exactly these words in
 *   little-endian order, so saving is one copy and loading needs no decoding.
 *
 * Invariant: bits past `chunkCount` in the last word are always zero, so
 * `count()` and `equals()` never see garbage.
 */

export class ChangeBitmap {
  readonly deviceSize: number;
  readonly chunkSize: number;
  readonly chunkCount: number;
  readonly words: Uint32Array;
  /** Sectors per chunk: chunk of a sector = floor(sector / spc). */
  private readonly spc: number;

  constructor(deviceSize: number, chunkSize: number, words?: Uint32Array) {
    if (!Number.isSafeInteger(deviceSize) || deviceSize <= 0) {
      throw new BlocksnapError('E_TRACKER', `invalid device size ${deviceSize}`);
    }
    // The tracker's granularity rule, not the chunk-size rule: any power of two from one sector up.
    if (!isValidTrackingGranularity(chunkSize)) {
      throw new BlocksnapError('E_TRACKER', `chunk size ${chunkSize} is not a power of two >= ${SECTOR_SIZE}`);
    }
    this.deviceSize = deviceSize;
    this.chunkSize = chunkSize;
    this.chunkCount = chunkCountOf(deviceSize, chunkSize);
    this.spc = chunkSize / SECTOR_SIZE;
    const wordCount = ChangeBitmap.wordCount(this.chunkCount);
    if (words) {
      if (words.length !== wordCount) {
        throw new BlocksnapError('E_FORMAT', `bitmap has ${words.length} words, expected ${wordCount}`);
      }
      const tail = this.chunkCount & 31;
      if (tail !== 0 && (words[wordCount - 1]! >>> tail) !== 0) {
        throw new BlocksnapError('E_FORMAT', 'bitmap has bits set past the last chunk');
      }
    }
    this.words = words ?? new Uint32Array(wordCount);
  }

  static wordCount(chunkCount: number): number {
    return Math.ceil(chunkCount / 32);
  }

  /**
   * Marks every chunk touched by `count` 512-byte sectors from `sector`.
   * Returns false (and marks nothing past the end) when the range goes beyond
   * the device: the caller treats that as "the device is not the one we
   * track" (it grew), which invalidates the bitmap.
   */
  setSectors(sector: number, count: number): boolean {
    if (count <= 0) return true;
    const first = Math.floor(sector / this.spc);
    const last = Math.floor((sector + count - 1) / this.spc);
    if (first >= this.chunkCount) return false;
    if (last >= this.chunkCount) {
      this.setChunks(first, this.chunkCount - 1);
      return false;
    }
    this.setChunks(first, last);
    return true;
  }

  /** Marks the chunks touched by a byte range (offset, length). */
  setBytes(offset: number, length: number): boolean {
    if (length <= 0) return true;
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    if (first >= this.chunkCount) return false;
    this.setChunks(first, Math.min(last, this.chunkCount - 1));
    return last < this.chunkCount;
  }

  /** Sets chunks first..last inclusive (both must be < chunkCount). */
  setChunks(first: number, last: number): void {
    const w = this.words;
    const fw = first >>> 5;
    const lw = last >>> 5;
    const fmask = (0xffffffff << (first & 31)) >>> 0;
    const lmask = 0xffffffff >>> (31 - (last & 31));
    if (fw === lw) {
      w[fw] = w[fw]! | (fmask & lmask);
      return;
    }
    w[fw] = w[fw]! | fmask;
    for (let i = fw + 1; i < lw; i++) w[i] = 0xffffffff;
    w[lw] = w[lw]! | lmask;
  }

  setChunk(index: number): void {
    this.setChunks(index, index);
  }

  has(index: number): boolean {
    if (index < 0 || index >= this.chunkCount) return false;
    return ((this.words[index >>> 5]! >>> (index & 31)) & 1) === 1;
  }

  /** Index of the first set chunk >= from, or -1. */
  nextSet(from: number): number {
    if (from >= this.chunkCount) return -1;
    let wi = from >>> 5;
    let word = this.words[wi]! & ((0xffffffff << (from & 31)) >>> 0);
    for (;;) {
      if (word !== 0) return wi * 32 + (31 - Math.clz32(word & -word));
      wi++;
      if (wi >= this.words.length) return -1;
      word = this.words[wi]!;
    }
  }

  /** Set chunk indexes in increasing order. */
  *indexes(): IterableIterator<number> {
    for (let i = this.nextSet(0); i >= 0; i = this.nextSet(i + 1)) yield i;
  }

  count(): number {
    let n = 0;
    const w = this.words;
    for (let i = 0; i < w.length; i++) {
      let v = w[i]!;
      v -= (v >>> 1) & 0x55555555;
      v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
      n += (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
    }
    return n;
  }

  /** this |= other; both must describe the same device and chunk size. */
  unionWith(other: ChangeBitmap): this {
    this.assertSameShape(other);
    const a = this.words;
    const b = other.words;
    for (let i = 0; i < a.length; i++) a[i] = a[i]! | b[i]!;
    return this;
  }

  /** Marks every chunk (the answer when tracking is not trusted). */
  fill(): this {
    if (this.chunkCount > 0) this.setChunks(0, this.chunkCount - 1);
    return this;
  }

  clear(): this {
    this.words.fill(0);
    return this;
  }

  clone(): ChangeBitmap {
    return new ChangeBitmap(this.deviceSize, this.chunkSize, this.words.slice());
  }

  equals(other: ChangeBitmap): boolean {
    if (other.deviceSize !== this.deviceSize || other.chunkSize !== this.chunkSize) return false;
    for (let i = 0; i < this.words.length; i++) if (this.words[i] !== other.words[i]) return false;
    return true;
  }

  /** The words as little-endian bytes (the persisted form). */
  toBytes(): Buffer {
    const out = Buffer.allocUnsafe(this.words.length * 4);
    for (let i = 0; i < this.words.length; i++) out.writeUInt32LE(this.words[i]!, i * 4);
    return out;
  }

  static fromBytes(bytes: Uint8Array, deviceSize: number, chunkSize: number): ChangeBitmap {
    const chunkCount = chunkCountOf(deviceSize, chunkSize);
    const n = ChangeBitmap.wordCount(chunkCount);
    if (bytes.length !== n * 4) {
      throw new BlocksnapError('E_FORMAT', `bitmap is ${bytes.length} bytes, expected ${n * 4}`);
    }
    const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const words = new Uint32Array(n);
    for (let i = 0; i < n; i++) words[i] = buf.readUInt32LE(i * 4);
    return new ChangeBitmap(deviceSize, chunkSize, words);
  }

  private assertSameShape(other: ChangeBitmap): void {
    if (other.deviceSize !== this.deviceSize || other.chunkSize !== this.chunkSize) {
      throw new BlocksnapError(
        'E_TRACKER',
        `bitmap shape mismatch: ${this.deviceSize}/${this.chunkSize} vs ${other.deviceSize}/${other.chunkSize}`,
      );
    }
  }
}
