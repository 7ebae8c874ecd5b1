/**
 * Read access to one committed image as a byte range: maps offsets to chunk
 * digests through the image index and fetches chunks from the chunk store
 * (decompressed and re-hashed by the store). A ZERO digest is a hole and is
 * never fetched. A small LRU keeps recently decompressed chunks so reads
 * smaller than a chunk (a client's 4 KiB probes) do not decompress it again.
 */
import { BlocksnapError } from '../../proto/errors.js';
import { ZERO_DIGEST, type ChunkStore } from '../store/chunk-store.js';
import { ImageIndexReader } from '../store/image-index.js';
import { SLOTS_PER_PAGE } from '../../proto/shared/image-root.js';

/** A piece of a read: bytes, or a hole of zeros of `length` bytes. */
export type Segment = { offset: number; data: Buffer } | { offset: number; hole: number };

export class ImageSource {
  private readonly lru = new Map<string, Buffer>();

  private constructor(
    private readonly store: ChunkStore,
    private readonly reader: ImageIndexReader,
    private readonly cacheChunks: number,
  ) {}

  static async open(store: ChunkStore, rootDigest: Buffer, cacheChunks = 32): Promise<ImageSource> {
    return new ImageSource(store, await ImageIndexReader.open(store, rootDigest), cacheChunks);
  }

  get size(): number { return this.reader.volumeSize; }
  get chunkSize(): number { return this.reader.chunkSize; }

  /** Segments covering [offset, offset+length) in order; adjacent holes merged. Caller checks bounds. */
  async read(offset: number, length: number): Promise<Segment[]> {
    const end = offset + length;
    if (offset < 0 || length < 0 || end > this.size) {
      throw new BlocksnapError('E_CHUNK_RANGE', `read of ${length} at ${offset} outside the ${this.size}-byte image`);
    }
    const cs = this.chunkSize;
    const out: Array<Segment | Promise<Segment>> = [];
    for (let pos = offset; pos < end;) {
      const index = Math.floor(pos / cs);
      const chunkStart = index * cs;
      const stop = Math.min(end, chunkStart + cs);
      const digest = await this.reader.digestAt(index);
      const last = out.at(-1);
      if (digest.equals(ZERO_DIGEST)) {
        if (last && !(last instanceof Promise) && 'hole' in last) last.hole += stop - pos;
        else out.push({ offset: pos, hole: stop - pos });
      } else {
        // Chunks of one read are fetched at the same time.
        const from = pos;
        out.push(this.chunk(Buffer.from(digest)).then((plain): Segment => {
          if (plain.length < stop - chunkStart) {
            throw new BlocksnapError('E_STORE_CORRUPT', `chunk ${index} holds ${plain.length} bytes, ${stop - chunkStart} needed`);
          }
          return { offset: from, data: plain.subarray(from - chunkStart, stop - chunkStart) };
        }));
      }
      pos = stop;
    }
    return Promise.all(out);
  }

  /**
   * Runs of data / zero (ZERO digest) over [offset, offset+length), at most
   * `maxRuns` of them (the last may then stop short of the end). An all-ZERO
   * page is skipped whole without loading anything.
   */
  async runs(offset: number, length: number, maxRuns: number): Promise<Array<{ length: number; zero: boolean }>> {
    const end = offset + length;
    if (offset < 0 || length <= 0 || end > this.size) {
      throw new BlocksnapError('E_CHUNK_RANGE', `status of ${length} at ${offset} outside the ${this.size}-byte image`);
    }
    const cs = this.chunkSize;
    const out: Array<{ length: number; zero: boolean }> = [];
    for (let pos = offset; pos < end;) {
      const index = Math.floor(pos / cs);
      const page = Math.floor(index / SLOTS_PER_PAGE);
      let stop: number;
      let zero: boolean;
      if (this.reader.pageDigest(page).equals(ZERO_DIGEST)) {
        stop = Math.min(end, (page + 1) * SLOTS_PER_PAGE * cs);
        zero = true;
      } else {
        stop = Math.min(end, (index + 1) * cs);
        zero = (await this.reader.digestAt(index)).equals(ZERO_DIGEST);
      }
      const last = out.at(-1);
      if (last && last.zero === zero) last.length += stop - pos;
      else if (out.length === maxRuns) break;
      else out.push({ length: stop - pos, zero });
      pos = stop;
    }
    return out;
  }

  private async chunk(digest: Buffer): Promise<Buffer> {
    const key = digest.toString('hex');
    const hit = this.lru.get(key);
    if (hit) {
      this.lru.delete(key);
      this.lru.set(key, hit);
      return hit;
    }
    const plain = await this.store.get(digest);
    if (this.cacheChunks > 0) {
      this.lru.set(key, plain);
      if (this.lru.size > this.cacheChunks) this.lru.delete(this.lru.keys().next().value!);
    }
    return plain;
  }
}
