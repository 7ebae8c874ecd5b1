/**
 * Copy-on-write overlay of one mount (issue 9, item 2): what clients write to
 * a writable export lands here, never in the image. A directory of two files,
 * frozen layout (changing a byte breaks every overlay on disk; pinned by
 * test/nbd/cow-overlay.test.ts). All integers little-endian.
 *
 * `map` — header and chunk states:
 * ```
 * offset  size  field
 * 0       8     magic "BSNCOW\0\0"
 * 8       2     version = 1
 * 10      2     bits per chunk state = 2
 * 12      4     chunk size (u32, bytes)
 * 16      8     volume size (u64, bytes)
 * 24      8     chunk count N = ceil(volume size / chunk size) (u64)
 * 32      32    root digest of the image this overlay belongs to
 * 64      16    first 16 bytes of SHA-256 over bytes 0..63
 * 80      4016  zero
 * 4096    ceil(N/4)  chunk states, 2 bits each: chunk i in byte 4096 + ⌊i/4⌋,
 *               bits 2·(i mod 4) and up: 0 = image (read through to the image),
 *               1 = data (extent i of `data` holds the whole chunk),
 *               2 = zero (reads as zeros), 3 = invalid
 * ```
 * `data` — sparse: extent i at byte i × chunk size, as long as chunk i (the
 * last one may be short). Only chunks written by clients are ever allocated.
 *
 * Creating writes the header and sizes both files sparsely: O(1) in the image
 * size. Opening proves the overlay belongs to the image it is applied to
 * (root digest, size and chunk size equal: else E_IDENTITY; a damaged header
 * or map: E_FORMAT).
 *
 * Durability (flush): the states that changed are copied, then `data` is
 * fsynced, then the copied map pages are written and `map` is fsynced. So a
 * state on disk never says "data" for an extent whose bytes are not durable;
 * a crash loses at most what was not flushed (NBD's contract), and a torn map
 * page leaves each chunk's state either before or after that flush.
 * Writes to one chunk hold its lock (writes to a range lock its chunks in
 * ascending order): a partial write of a chunk still in the image copies the
 * chunk up (image bytes + the new ones, one whole extent) before its state
 * says data, and two concurrent partial writes of a chunk never lose either.
 * Zeroing whole chunks only flips their state: Node has no hole punching, so
 * TRIM does not give the space of already written extents back (documented
 * in DESIGN §10).
 *
 * A flush does the least that keeps that order: nothing when nothing was
 * written or zeroed since the last one; fdatasync of `data` (its size never
 * changes, only the extents written are new); the map pages and a map
 * fdatasync only when a state changed. `volatile` overlays (the mount
 * manager's: it removes every overlay at the next start, so none outlives
 * its process, DESIGN §6.2) skip the syncs: a flush returns at once (every
 * acknowledged write is already in the page cache, read back by every
 * connection) and close writes the changed map pages without syncing.
 */
import { createHash } from 'node:crypto';
import { open, stat, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { makePrivateDir, writeDurable, fsyncDir } from '../../proto/shared/durable-file.js';

export const COW_MAGIC = Buffer.from('BSNCOW\0\0', 'latin1');
export const COW_VERSION = 1;
export const COW_HEADER_SIZE = 4096;
export const COW_HEADER_FIELDS = 64;
export const COW_CHECKSUM_SIZE = 16;
export const MAP_FILE = 'map';
export const DATA_FILE = 'data';

export const ChunkState = Object.freeze({ IMAGE: 0, DATA: 1, ZERO: 2 });
export type ChunkStateValue = 0 | 1 | 2;

/** What an overlay belongs to. */
export interface OverlayIdentity {
  volumeSize: number;
  chunkSize: number;
  rootDigest: Buffer;
}

/** Map pages written at flush (the unit of dirtiness). */
const MAP_PAGE = 4096;

export interface CowOverlayOptions {
  /**
   * The overlay never outlives this process (it is removed at the next
   * start): flush does not fsync, close writes the map without syncing.
   */
  volatile?: boolean;
}

export function encodeCowHeader(id: OverlayIdentity): Buffer {
  const b = Buffer.alloc(COW_HEADER_SIZE);
  COW_MAGIC.copy(b, 0);
  b.writeUInt16LE(COW_VERSION, 8);
  b.writeUInt16LE(2, 10);
  b.writeUInt32LE(id.chunkSize, 12);
  b.writeBigUInt64LE(BigInt(id.volumeSize), 16);
  b.writeBigUInt64LE(BigInt(chunkCount(id)), 24);
  if (id.rootDigest.length !== 32) throw new BlocksnapError('E_INTERNAL', 'root digest must be 32 bytes');
  id.rootDigest.copy(b, 32);
  createHash('sha256').update(b.subarray(0, COW_HEADER_FIELDS)).digest().copy(b, COW_HEADER_FIELDS, 0, COW_CHECKSUM_SIZE);
  return b;
}

/** Header → identity; E_FORMAT when it is not a valid overlay header. */
export function decodeCowHeader(b: Buffer): OverlayIdentity {
  const bad = (why: string): BlocksnapError => new BlocksnapError('E_FORMAT', `overlay header: ${why}`);
  if (b.length < COW_HEADER_FIELDS + COW_CHECKSUM_SIZE) throw bad('truncated');
  if (!b.subarray(0, 8).equals(COW_MAGIC)) throw bad('bad magic');
  const sum = createHash('sha256').update(b.subarray(0, COW_HEADER_FIELDS)).digest().subarray(0, COW_CHECKSUM_SIZE);
  if (!sum.equals(b.subarray(COW_HEADER_FIELDS, COW_HEADER_FIELDS + COW_CHECKSUM_SIZE))) throw bad('checksum mismatch');
  if (b.readUInt16LE(8) !== COW_VERSION) throw bad(`version ${b.readUInt16LE(8)}`);
  if (b.readUInt16LE(10) !== 2) throw bad('state width');
  const id = {
    chunkSize: b.readUInt32LE(12),
    volumeSize: Number(b.readBigUInt64LE(16)),
    rootDigest: Buffer.from(b.subarray(32, 64)),
  };
  if (id.chunkSize === 0 || Number(b.readBigUInt64LE(24)) !== chunkCount(id)) throw bad('chunk count');
  return id;
}

export function chunkCount(id: Pick<OverlayIdentity, 'volumeSize' | 'chunkSize'>): number {
  return Math.ceil(id.volumeSize / id.chunkSize);
}

function mapBytes(id: OverlayIdentity): number {
  return Math.ceil(chunkCount(id) / 4);
}

export class CowOverlay {
  private readonly dirtyPages = new Set<number>();
  private readonly lockTails = new Map<number, Promise<void>>();
  private flushing: Promise<void> = Promise.resolve();
  private closed = false;
  /** Data written since the last flush took its copy of the states. */
  private written = false;

  private constructor(
    readonly dir: string,
    readonly identity: OverlayIdentity,
    private readonly map: FileHandle,
    private readonly data: FileHandle,
    /** Chunk states, in memory: the map file's bytes after the header. */
    private readonly states: Uint8Array,
    readonly volatile: boolean,
  ) {}

  get volumeSize(): number { return this.identity.volumeSize; }
  get chunkSize(): number { return this.identity.chunkSize; }
  get rootDigest(): Buffer { return this.identity.rootDigest; }

  /** A new, empty overlay for an image in `dir` (created; must not hold one already). */
  static async create(dir: string, id: OverlayIdentity, opts: CowOverlayOptions = {}): Promise<CowOverlay> {
    await makePrivateDir(dir);
    if (await stat(join(dir, MAP_FILE)).then(() => true, () => false)) {
      throw new BlocksnapError('E_BUSY', `${dir} already holds an overlay`);
    }
    const header = encodeCowHeader(id);
    await writeDurable(join(dir, DATA_FILE), async (fh) => {
      await fh.truncate(id.volumeSize); // sparse
    });
    // The map last: an overlay without a valid map is not an overlay.
    await writeDurable(join(dir, MAP_FILE), async (fh) => {
      await fh.write(header, 0, header.length, 0);
      await fh.truncate(COW_HEADER_SIZE + mapBytes(id)); // sparse: every chunk "image"
    });
    await fsyncDir(dir);
    return CowOverlay.open(dir, id, opts);
  }

  /** Opens the overlay in `dir`, proving it belongs to the image `expected` describes. */
  static async open(dir: string, expected: OverlayIdentity, opts: CowOverlayOptions = {}): Promise<CowOverlay> {
    let map: FileHandle | undefined;
    let data: FileHandle | undefined;
    try {
      map = await open(join(dir, MAP_FILE), 'r+');
      const bytes = await map.readFile();
      const id = decodeCowHeader(bytes);
      if (!id.rootDigest.equals(expected.rootDigest) || id.volumeSize !== expected.volumeSize || id.chunkSize !== expected.chunkSize) {
        throw new BlocksnapError(
          'E_IDENTITY',
          `overlay ${dir} belongs to image ${id.rootDigest.toString('hex').slice(0, 16)}… (${id.volumeSize} bytes, ${id.chunkSize}-byte chunks), ` +
            `not to ${expected.rootDigest.toString('hex').slice(0, 16)}… (${expected.volumeSize} bytes, ${expected.chunkSize}-byte chunks)`,
        );
      }
      if (bytes.length !== COW_HEADER_SIZE + mapBytes(id)) {
        throw new BlocksnapError('E_FORMAT', `overlay map of ${bytes.length} bytes, ${COW_HEADER_SIZE + mapBytes(id)} expected`);
      }
      const states = new Uint8Array(bytes.buffer, bytes.byteOffset + COW_HEADER_SIZE, mapBytes(id));
      for (let i = 0; i < states.length; i++) {
        const v = states[i]!;
        // 0b11 in any 2-bit slot is invalid.
        if ((v & (v >> 1) & 0x55) !== 0) throw new BlocksnapError('E_FORMAT', `overlay map: invalid state at chunk ${i * 4}..${i * 4 + 3}`);
      }
      const n = chunkCount(id);
      if (n % 4 !== 0 && (states[states.length - 1]! >> (2 * (n % 4))) !== 0) {
        throw new BlocksnapError('E_FORMAT', 'overlay map: state past the last chunk');
      }
      data = await open(join(dir, DATA_FILE), 'r+');
      if ((await data.stat()).size !== id.volumeSize) throw new BlocksnapError('E_FORMAT', `overlay data file is not ${id.volumeSize} bytes`);
      return new CowOverlay(dir, id, map, data, states, opts.volatile === true);
    } catch (e) {
      await map?.close().catch(() => undefined);
      await data?.close().catch(() => undefined);
      if (e instanceof BlocksnapError) throw e;
      throw new BlocksnapError('E_FORMAT', `cannot open overlay ${dir}: ${(e as Error).message}`, { cause: e });
    }
  }

  state(i: number): ChunkStateValue {
    return ((this.states[i >> 2]! >> (2 * (i & 3))) & 3) as ChunkStateValue;
  }

  /** Changes a chunk's state in memory; written at the next flush. */
  setState(i: number, s: ChunkStateValue): void {
    const shift = 2 * (i & 3);
    const at = i >> 2;
    const next = (this.states[at]! & ~(3 << shift)) | (s << shift);
    if (next === this.states[at]) return; // unchanged (a rewrite of a data chunk): no map write at the next flush
    this.states[at] = next;
    this.dirtyPages.add(Math.floor(at / MAP_PAGE));
  }

  /** First chunk at or after `from` (below `to`) whose state is not IMAGE, or `to`. Skips untouched map bytes whole. */
  nextTouched(from: number, to: number): number {
    let i = from;
    while (i < to) {
      if ((i & 3) === 0 && this.states[i >> 2] === 0) {
        i += 4;
        continue;
      }
      if (this.state(i) !== ChunkState.IMAGE) return i;
      i++;
    }
    return to;
  }

  /** Length of chunk i (the last may be short). */
  extentLength(i: number): number {
    return Math.min(this.chunkSize, this.volumeSize - i * this.chunkSize);
  }

  /**
   * Runs `fn` holding the locks of chunks first..last (taken in ascending
   * order, so overlapping ranges cannot deadlock).
   */
  async withChunks<T>(first: number, last: number, fn: () => Promise<T>): Promise<T> {
    const releases: Array<() => void> = [];
    try {
      for (let i = first; i <= last; i++) releases.push(await this.acquire(i));
      return await fn();
    } finally {
      for (const r of releases) r();
    }
  }

  private async acquire(i: number): Promise<() => void> {
    const prev = this.lockTails.get(i) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => { release = r; });
    const tail = prev.then(() => mine);
    this.lockTails.set(i, tail);
    await prev;
    return () => {
      release();
      if (this.lockTails.get(i) === tail) this.lockTails.delete(i);
    };
  }

  /** Bytes of the data file at absolute volume offset `offset`. */
  async readData(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    let got = 0;
    while (got < length) {
      const { bytesRead } = await this.data.read(buf, got, length - got, offset + got);
      if (bytesRead === 0) throw new BlocksnapError('E_STORE_IO', `overlay data file ends before ${offset + length}`);
      got += bytesRead;
    }
    return buf;
  }

  async writeData(offset: number, bytes: Buffer): Promise<void> {
    this.assertOpen();
    let put = 0;
    while (put < bytes.length) {
      const { bytesWritten } = await this.data.write(bytes, put, bytes.length - put, offset + put);
      put += bytesWritten;
    }
    // Set once the bytes are in: a flush that began before then need not cover them, the next one must.
    this.written = true;
  }

  /**
   * Makes every write and state change done before the call durable: data
   * fsync, then the changed map pages, then map fsync. Flushes run one at a time.
   */
  flush(): Promise<void> {
    if (this.volatile) return Promise.resolve();
    return this.flushSerial(true);
  }

  private flushSerial(sync: boolean): Promise<void> {
    const run = this.flushing.then(() => this.flushOnce(sync));
    this.flushing = run.catch(() => undefined);
    return run;
  }

  private async flushOnce(sync: boolean): Promise<void> {
    if (this.closed) return;
    // Nothing written or zeroed since the last flush: nothing to make durable.
    if (!this.written && this.dirtyPages.size === 0) return;
    // Copy the states first: anything set after this point may describe data
    // the fsync below does not cover, so it waits for the next flush.
    const pages = [...this.dirtyPages].sort((a, b) => a - b);
    this.dirtyPages.clear();
    const written = this.written;
    this.written = false;
    const copies = pages.map((p) => Buffer.from(this.states.subarray(p * MAP_PAGE, Math.min(this.states.length, (p + 1) * MAP_PAGE))));
    try {
      if (sync && written) await this.data.datasync();
      for (let k = 0; k < pages.length; k++) {
        const c = copies[k]!;
        await this.map.write(c, 0, c.length, COW_HEADER_SIZE + pages[k]! * MAP_PAGE);
      }
      if (sync && pages.length > 0) await this.map.datasync();
    } catch (e) {
      if (written) this.written = true;
      for (const p of pages) this.dirtyPages.add(p);
      throw new BlocksnapError('E_STORE_IO', `overlay flush failed: ${(e as Error).message}`, { cause: e });
    }
  }

  /** Bytes the overlay takes on disk (data allocated + map). */
  async allocatedBytes(): Promise<number> {
    const [d, m] = await Promise.all([stat(join(this.dir, DATA_FILE)), stat(join(this.dir, MAP_FILE))]);
    return (d.blocks + m.blocks) * 512;
  }

  /** Flushes (a volatile overlay: writes its map pages, no sync), then closes the files. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.flushSerial(!this.volatile);
    this.closed = true;
    await Promise.allSettled([this.map.close(), this.data.close()]);
  }

  private assertOpen(): void {
    if (this.closed) throw new BlocksnapError('E_STORE_IO', `overlay ${this.dir} is closed`);
  }
}
