/**
 * ChunkStore on a local directory (the `store/` of DESIGN.md §2): packs under
 * packs/HH/, temp packs under tmp/, the blob index in index.sqlite.
 *
 * Opening the store empties tmp/ (half-written packs and manifests of a dead
 * process) and indexes every pack that is in packs/ but not in the index
 * (a crash between rename and index insert, §5).
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import type { Logger } from '../../proto/log.js';
import { BlobIndex, indexPacksFromFiles } from './blob-index.js';
import { ZERO_DIGEST, type BlobLocation, type BlobType, type BlobWriter, type ChunkStore, type PutResult } from './chunk-store.js';
import { CODEC_NONE, CODEC_ZSTD, type Codec } from './pack-format.js';
import { PackReaderCache } from './pack-reader.js';
import { DEFAULT_WRITE_BUFFER, PackWriter } from './pack-writer.js';
import { DEFAULT_ZSTD_LEVEL, zstdCompress, zstdDeclaredSize } from '../../proto/zstd.js';

export const DEFAULT_TARGET_PACK_SIZE = 32 * 1024 * 1024;
export const DEFAULT_READ_HANDLES = 32;

export interface FsChunkStoreOptions {
  /** A writer starts a new pack when the next blob would exceed this (bytes). */
  targetPackSize?: number;
  /** Open pack files kept for reads (LRU). */
  readHandles?: number;
  /** Staging buffer of a pack writer; payloads reach the file in writes of about this size. */
  writeBufferSize?: number;
  /** zstd level for blobs put without a compressed form (pages, roots). */
  compressionLevel?: number;
  logger?: Logger;
}

export interface ResolvedStoreOptions {
  targetPackSize: number;
  writeBufferSize: number;
  compressionLevel: number;
}

export class FsChunkStore implements ChunkStore {
  readonly packsDir: string;
  readonly tmpDir: string;
  /** Writers holding digests in packs not yet indexed (they have temp files). */
  private readonly active = new Set<FsBlobWriter>();
  private readonly readers: PackReaderCache;
  private closed = false;

  private constructor(
    readonly dir: string,
    readonly index: BlobIndex,
    readonly options: ResolvedStoreOptions,
    readHandles: number,
  ) {
    this.packsDir = join(dir, 'packs');
    this.tmpDir = join(dir, 'tmp');
    this.readers = new PackReaderCache(this.packsDir, readHandles);
  }

  /** `dir` is the store directory (DATA/store); it is created if missing. */
  static async open(dir: string, opts: FsChunkStoreOptions = {}): Promise<FsChunkStore> {
    const options: ResolvedStoreOptions = {
      targetPackSize: opts.targetPackSize ?? DEFAULT_TARGET_PACK_SIZE,
      writeBufferSize: opts.writeBufferSize ?? DEFAULT_WRITE_BUFFER,
      compressionLevel: opts.compressionLevel ?? DEFAULT_ZSTD_LEVEL,
    };
    if (!(options.targetPackSize > 0) || !(options.writeBufferSize > 0)) {
      throw new BlocksnapError('E_CONFIG', 'targetPackSize and writeBufferSize must be positive');
    }
    const packsDir = join(dir, 'packs');
    const tmpDir = join(dir, 'tmp');
    try {
      await mkdir(packsDir, { recursive: true });
      await mkdir(tmpDir, { recursive: true });
      const leftovers = await readdir(tmpDir);
      await Promise.all(leftovers.map((name) => rm(join(tmpDir, name), { recursive: true, force: true })));
      if (leftovers.length > 0) opts.logger?.info({ tmpDir, removed: leftovers.length }, 'emptied store tmp');
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `cannot prepare store ${dir}: ${(e as Error).message}`, { cause: e });
    }
    const index = BlobIndex.open(join(dir, 'index.sqlite'));
    try {
      const found = await indexPacksFromFiles(index, packsDir, { all: false });
      if (found.packs > 0) opts.logger?.warn(found, 'indexed packs missing from the blob index');
    } catch (e) {
      index.close();
      throw e;
    }
    return new FsChunkStore(dir, index, options, opts.readHandles ?? DEFAULT_READ_HANDLES);
  }

  openWriter(): BlobWriter {
    this.checkOpen();
    return new FsBlobWriter(this);
  }

  async get(digest: Buffer): Promise<Buffer> {
    this.checkOpen();
    const hex = digest.toString('hex');
    const loc = this.index.lookup(digest);
    if (!loc) throw new BlocksnapError('E_NOT_FOUND', `blob ${hex} not found`);
    try {
      return await this.readers.use(loc.pack, (r) => r.readBlob(digest, loc));
    } catch (e) {
      // Every failure names pack and blob, so an operator can find both.
      if (e instanceof BlocksnapError && !e.message.includes(hex)) {
        throw new BlocksnapError(e.code, `blob ${hex}: ${e.message}`, { cause: e });
      }
      throw e;
    }
  }

  has(digest: Buffer): boolean {
    this.checkOpen();
    return this.index.has(digest);
  }

  locate(digest: Buffer): BlobLocation | undefined {
    this.checkOpen();
    return this.index.lookup(digest);
  }

  stats(): { packs: number; blobs: number; bytes: number } {
    this.checkOpen();
    return this.index.stats();
  }

  /** Rebuilds the blob index from the pack trailers alone (`store reindex`). */
  async reindex(): Promise<{ packs: number; blobs: number }> {
    this.checkOpen();
    if (this.active.size > 0) throw new BlocksnapError('E_BUSY', 'cannot reindex while blob writers are open');
    return indexPacksFromFiles(this.index, this.packsDir, { all: true });
  }

  /** Aborts writers still open (their unflushed blobs were never durable) and releases everything. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.active].map((w) => w.abort()));
    await this.readers.close();
    this.index.close();
  }

  /** @internal true if another open writer holds `key` in a pack not yet indexed. */
  pendingElsewhere(key: string, me: FsBlobWriter): boolean {
    for (const w of this.active) if (w !== me && w.holds(key)) return true;
    return false;
  }

  /** @internal a writer is active from its first pending digest until none is left. */
  activate(w: FsBlobWriter): void {
    this.active.add(w);
  }

  /** @internal */
  release(w: FsBlobWriter): void {
    this.active.delete(w);
  }

  /** @internal */
  checkOpen(): void {
    if (this.closed) throw new BlocksnapError('E_STORE_IO', 'chunk store is closed');
  }
}

const NOT_STORED: PutResult = Object.freeze({ stored: false, storedBytes: 0 });
const ZERO_BLOCK = Buffer.alloc(64 * 1024);

function isAllZero(buf: Buffer): boolean {
  for (let off = 0; off < buf.length; off += ZERO_BLOCK.length) {
    const end = Math.min(buf.length, off + ZERO_BLOCK.length);
    if (!buf.subarray(off, end).equals(ZERO_BLOCK.subarray(0, end - off))) return false;
  }
  return true;
}

/** A blob another writer holds unflushed; kept so our flush does not depend on theirs. */
interface Borrowed {
  type: BlobType;
  digest: Buffer;
  codec: Codec;
  plainLength: number;
  payload: Buffer;
}

/**
 * One ingest's writer. Digests of its unindexed packs are in `pending`; a
 * digest another writer holds unflushed is "borrowed": not stored now, but
 * re-checked at our flush and stored by us if that writer has not made it
 * durable yet (it may still abort), so a flush never promises a blob that
 * is not durable. Duplicates across packs are harmless (§3.1).
 */
class FsBlobWriter implements BlobWriter {
  private pack: PackWriter | undefined;
  private packKeys: string[] = [];
  private readonly pending = new Set<string>();
  private readonly borrowed = new Map<string, Borrowed>();
  private readonly closing = new Set<Promise<void>>();
  private bytesSinceFlush = 0;
  private failure: BlocksnapError | undefined;
  private done = false;

  constructor(private readonly store: FsChunkStore) {}

  holds(key: string): boolean {
    return this.pending.has(key);
  }

  async put(type: BlobType, digest: Buffer, plain: Buffer, compressed?: Buffer): Promise<PutResult> {
    this.check();
    if (digest.length !== 32) throw new BlocksnapError('E_STORE_IO', `digest is ${digest.length} bytes`);
    if (type !== 1 && type !== 2 && type !== 3) throw new BlocksnapError('E_STORE_IO', `unknown blob type ${type}`);
    if (plain.length === 0) throw new BlocksnapError('E_STORE_IO', 'refusing to store an empty blob');
    if (digest.equals(ZERO_DIGEST) || isAllZero(plain)) {
      throw new BlocksnapError('E_STORE_IO', 'refusing to store an all-zero blob: record ZERO instead');
    }
    const key = digest.toString('hex');
    if (this.pending.has(key) || this.borrowed.has(key) || this.store.index.has(digest)) return NOT_STORED;
    let codec: Codec = CODEC_NONE;
    let payload = plain;
    if (compressed) {
      const declared = zstdDeclaredSize(compressed);
      if (declared !== null && declared !== plain.length) {
        throw new BlocksnapError('E_INTERNAL', `compressed form of ${key} declares ${declared} bytes, plain has ${plain.length}`);
      }
      // The agent's frame is stored as-is; recompressing would cost a core.
      if (compressed.length < plain.length) [codec, payload] = [CODEC_ZSTD, compressed];
    } else {
      const c = zstdCompress(plain, this.store.options.compressionLevel);
      if (c.length < plain.length) [codec, payload] = [CODEC_ZSTD, c];
    }
    if (this.store.pendingElsewhere(key, this)) {
      this.borrowed.set(key, { type, digest: Buffer.from(digest), codec, plainLength: plain.length, payload: Buffer.from(payload) });
      return NOT_STORED;
    }
    await this.append(key, type, digest, codec, plain.length, payload);
    return { stored: true, storedBytes: payload.length };
  }

  async flush(): Promise<number> {
    this.check();
    for (const [key, b] of this.borrowed) {
      this.borrowed.delete(key);
      if (this.pending.has(key) || this.store.index.has(b.digest)) continue;
      await this.append(key, b.type, b.digest, b.codec, b.plainLength, b.payload);
    }
    this.seal();
    await Promise.allSettled([...this.closing]);
    this.check();
    const n = this.bytesSinceFlush;
    this.bytesSinceFlush = 0;
    return n;
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    const pack = this.pack;
    this.pack = undefined;
    for (const k of this.packKeys) this.pending.delete(k);
    this.packKeys = [];
    this.borrowed.clear();
    try {
      await pack?.abort();
      // Packs already sealed by a rollover finish: durable garbage, never half files.
      await Promise.allSettled([...this.closing]);
    } finally {
      this.pending.clear();
      this.store.release(this);
    }
  }

  /**
   * Everything up to the copy into the pack is synchronous, so a second put
   * of the same digest racing this one already sees it pending.
   */
  private async append(key: string, type: BlobType, digest: Buffer, codec: Codec, plainLength: number, payload: Buffer): Promise<void> {
    if (this.pack && this.pack.sizeWith(payload.length) > this.store.options.targetPackSize) this.seal();
    try {
      this.pack ??= new PackWriter(this.store.tmpDir, this.store.packsDir, this.store.options.writeBufferSize);
      this.pending.add(key);
      this.packKeys.push(key);
      this.store.activate(this);
      await this.pack.append(digest, type, codec, plainLength, payload);
    } catch (e) {
      this.failure ??= e instanceof BlocksnapError ? e : new BlocksnapError('E_STORE_IO', String(e), { cause: e });
      throw this.failure;
    }
    // Back-pressure: at most one sealed pack may still be syncing behind us.
    while (this.closing.size > 1) await Promise.race(this.closing);
    this.check();
  }

  /** Closes the current pack in the background: finish, then index rows, then release its digests. */
  private seal(): void {
    const pack = this.pack;
    if (!pack) return;
    const keys = this.packKeys;
    this.pack = undefined;
    this.packKeys = [];
    const p = (async () => {
      try {
        const done = await pack.finish();
        this.store.index.insertPack(done);
        this.bytesSinceFlush += done.size;
      } catch (e) {
        this.failure ??= e instanceof BlocksnapError ? e : new BlocksnapError('E_STORE_IO', String(e), { cause: e });
        await pack.abort();
      } finally {
        // Same tick as the insert: a digest is always either pending or indexed.
        for (const k of keys) this.pending.delete(k);
        if (this.pending.size === 0) this.store.release(this);
      }
    })();
    this.closing.add(p);
    void p.finally(() => this.closing.delete(p));
  }

  private check(): void {
    this.store.checkOpen();
    if (this.done) throw new BlocksnapError('E_STORE_IO', 'blob writer was aborted');
    if (this.failure) throw this.failure;
  }
}
