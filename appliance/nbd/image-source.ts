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

export interface ImageSourceOptions {
  /** Decompressed chunks kept (LRU). Default 32. Ignored when cacheBytes is set. */
  cacheChunks?: number;
  /** Budget of the LRU in bytes of decompressed chunks (rounded down to whole chunks). */
  cacheBytes?: number;
  /**
   * Chunks fetched ahead of a sequential reader (0 = off). A read that starts
   * where an earlier read of the last few ended counts as sequential (any
   * connection: nbdcopy reads one stream over several), and starts fetching
   * the next `readAhead` chunks into the cache.
   */
  readAhead?: number;
}

/** Ends of recent reads remembered to recognise sequential streams. */
const STREAMS = 16;

export class ImageSource {
  private readonly lru = new Map<string, Buffer>();
  /** Chunks being fetched (reads and read-ahead of one chunk share the fetch). */
  private readonly fetching = new Map<string, Promise<Buffer>>();
  /** End offsets of recent reads, newest last. */
  private readonly streamEnds: number[] = [];
  private readonly cacheChunks: number;
  private readonly readAhead: number;

  private constructor(
    private readonly store: ChunkStore,
    private readonly reader: ImageIndexReader,
    readonly rootDigest: Buffer,
    opts: ImageSourceOptions,
  ) {
    this.readAhead = Math.max(0, opts.readAhead ?? 0);
    const chunks = opts.cacheBytes !== undefined ? Math.floor(opts.cacheBytes / reader.chunkSize) : (opts.cacheChunks ?? 32);
    // Read-ahead needs room for what it fetched until the reader gets there.
    this.cacheChunks = Math.max(chunks, this.readAhead > 0 ? 2 * this.readAhead : 0);
  }

  static async open(store: ChunkStore, rootDigest: Buffer, opts: number | ImageSourceOptions = {}): Promise<ImageSource> {
    const o = typeof opts === 'number' ? { cacheChunks: opts } : opts;
    return new ImageSource(store, await ImageIndexReader.open(store, rootDigest), Buffer.from(rootDigest), o);
  }

  /** Decompressed chunks the LRU may hold. */
  get cacheCapacity(): number { return this.cacheChunks; }

  get size(): number { return this.reader.volumeSize; }
  get chunkSize(): number { return this.reader.chunkSize; }

  /** Segments covering [offset, offset+length) in order; adjacent holes merged. Caller checks bounds. */
  async read(offset: number, length: number): Promise<Segment[]> {
    const end = offset + length;
    if (offset < 0 || length < 0 || end > this.size) {
      throw new BlocksnapError('E_CHUNK_RANGE', `read of ${length} at ${offset} outside the ${this.size}-byte image`);
    }
    const cs = this.chunkSize;
    const out: Array<Segment | { offset: number; from: number; to: number; index: number; k: number }> = [];
    const wanted: Buffer[] = [];
    for (let pos = offset; pos < end;) {
      const index = Math.floor(pos / cs);
      const chunkStart = index * cs;
      const stop = Math.min(end, chunkStart + cs);
      const digest = await this.reader.digestAt(index);
      const last = out.at(-1);
      if (digest.equals(ZERO_DIGEST)) {
        if (last && 'hole' in last) last.hole += stop - pos;
        else out.push({ offset: pos, hole: stop - pos });
      } else {
        out.push({ offset: pos, from: pos - chunkStart, to: stop - chunkStart, index, k: wanted.length });
        wanted.push(Buffer.from(digest));
      }
      pos = stop;
    }
    if (this.readAhead > 0) this.noteRead(offset, end);
    // Chunks of one read are fetched together (one store call: a worker reads and re-hashes them).
    const fetched = this.chunks(wanted);
    return Promise.all(out.map(async (s): Promise<Segment> => {
      if (!('k' in s)) return s;
      const plain = await fetched[s.k]!;
      if (plain.length < s.to) {
        throw new BlocksnapError('E_STORE_CORRUPT', `chunk ${s.index} holds ${plain.length} bytes, ${s.to} needed`);
      }
      return { offset: s.offset, data: plain.subarray(s.from, s.to) };
    }));
  }

  /** Sequential detection and read-ahead (see ImageSourceOptions.readAhead). */
  private noteRead(offset: number, end: number): void {
    const k = this.streamEnds.indexOf(offset);
    if (k >= 0) this.streamEnds.splice(k, 1);
    this.streamEnds.push(end);
    if (this.streamEnds.length > STREAMS) this.streamEnds.shift();
    if (k < 0 || end >= this.size) return;
    const cs = this.chunkSize;
    const next = Math.ceil(end / cs);
    const last = Math.min(Math.ceil(this.size / cs) - 1, next + this.readAhead - 1);
    // Chunks cached or being fetched are not fetched again (chunk() shares them).
    for (let i = next; i <= last; i++) {
      void this.prefetch(i).catch(() => undefined); // a real read of it reports the error
    }
  }

  private async prefetch(index: number): Promise<void> {
    const digest = await this.reader.digestAt(index);
    if (digest.equals(ZERO_DIGEST)) return;
    await this.chunk(Buffer.from(digest));
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

  private chunk(digest: Buffer): Promise<Buffer> {
    return this.chunks([digest])[0]!;
  }

  /** Each digest's plain bytes: from the LRU, a fetch already running, or one store call for the rest. */
  private chunks(digests: Buffer[]): Promise<Buffer>[] {
    const out = new Array<Promise<Buffer>>(digests.length);
    const missing: Array<{ k: number; key: string }> = [];
    for (let k = 0; k < digests.length; k++) {
      const key = digests[k]!.toString('hex');
      const hit = this.lru.get(key);
      if (hit) {
        this.lru.delete(key);
        this.lru.set(key, hit);
        out[k] = Promise.resolve(hit);
        continue;
      }
      const pending = this.fetching.get(key);
      if (pending) out[k] = pending;
      else if (!missing.some((m) => m.key === key)) missing.push({ k, key });
    }
    if (missing.length === 0) return out;
    const store = this.store;
    const batch = store.getMany
      ? store.getMany(missing.map((m) => digests[m.k]!))
      : Promise.all(missing.map((m) => store.get(digests[m.k]!)));
    missing.forEach(({ k, key }, i) => {
      const p = batch.then((plains) => {
        const plain = plains[i]!;
        if (this.cacheChunks > 0) {
          this.lru.set(key, plain);
          if (this.lru.size > this.cacheChunks) this.lru.delete(this.lru.keys().next().value!);
        }
        return plain;
      }).finally(() => this.fetching.delete(key));
      this.fetching.set(key, p);
      out[k] = p;
    });
    // Same digest twice in one read: the later ones share the first one's fetch.
    for (let k = 0; k < digests.length; k++) out[k] ??= this.fetching.get(digests[k]!.toString('hex'))!;
    return out;
  }
}
