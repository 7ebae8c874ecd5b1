/**
 * In-memory ChunkStore for tests of code built on the store (image index,
 * ingest, a whole appliance: it is a RecoveringChunkStore). It passes test/store/chunk-store.contract.ts
 * (test/store/memory-chunk-store.test.ts) except the crash-recovery cases,
 * which are about pack files: all-zero payloads and the ZERO digest are
 * refused, puts de-duplicate against durable blobs and every open writer,
 * blobs become visible to get/has only after their writer's flush, abort
 * drops what was not flushed (but not a blob another writer de-duplicated
 * against it: that writer keeps its own copy), and get re-hashes so a test
 * can simulate corruption with `corruptForTest`. "Durable" is the
 * `MemoryChunkBacking`: a store opened again over the same backing (a reopen)
 * sees every flushed blob.
 */
import { createHash } from 'node:crypto';
import { BlocksnapError } from '../../proto/errors.js';
import {
  ZERO_DIGEST,
  type BlobLocation,
  type BlobType,
  type BlobWriter,
  type RecoveringChunkStore,
  type PutResult,
} from '../store/chunk-store.js';
import type { PendingCleanup, StoreRecovery } from '../store/fs-chunk-store.js';

interface StoredBlob {
  plain: Buffer;
  location: BlobLocation;
}

interface PendingBlob {
  type: BlobType;
  plain: Buffer;
  storedLength: number;
}

function isAllZero(buf: Buffer): boolean {
  // Compare in slices against a shared zero buffer: cheap and allocation-free.
  for (let off = 0; off < buf.length; off += ZERO_BLOCK.length) {
    const end = Math.min(buf.length, off + ZERO_BLOCK.length);
    if (!buf.subarray(off, end).equals(ZERO_BLOCK.subarray(0, end - off))) return false;
  }
  return true;
}
const ZERO_BLOCK = Buffer.alloc(64 * 1024);

/** What a MemoryChunkStore keeps across close and reopen: its "disk". */
export class MemoryChunkBacking {
  readonly durable = new Map<string, StoredBlob>();
  packSeq = 0;
  bytes = 0;

  /** Flips one byte of the blob stored at `loc` (the contract's corruptPayload). */
  corruptAt(loc: BlobLocation, byteIndex = 0): void {
    for (const blob of this.durable.values()) {
      if (blob.location.pack !== loc.pack || blob.location.offset !== loc.offset) continue;
      blob.plain[byteIndex % blob.plain.length] ^= 0xff;
      return;
    }
    throw new BlocksnapError('E_NOT_FOUND', `no blob at ${loc.pack}+${loc.offset}`);
  }
}

export class MemoryChunkStore implements RecoveringChunkStore {
  /** Nothing on disk to find damaged at open. */
  readonly recovery: StoreRecovery = { quarantined: [], missingPacks: [], lostBlobs: new Map() };
  private readonly durable: Map<string, StoredBlob>;
  private readonly writers = new Set<MemoryBlobWriter>();
  private closed = false;

  constructor(private readonly backing: MemoryChunkBacking = new MemoryChunkBacking()) {
    this.durable = backing.durable;
  }

  openWriter(): BlobWriter {
    this.checkOpen();
    const w = new MemoryBlobWriter(this);
    this.writers.add(w);
    return w;
  }

  async get(digest: Buffer): Promise<Buffer> {
    this.checkOpen();
    const hex = digest.toString('hex');
    const blob = this.durable.get(hex);
    if (!blob) throw new BlocksnapError('E_NOT_FOUND', `blob ${hex} not found`);
    const actual = createHash('sha256').update(blob.plain).digest();
    if (!actual.equals(digest)) {
      throw new BlocksnapError('E_STORE_CORRUPT', `blob ${hex} in pack ${blob.location.pack} fails its digest`);
    }
    return Buffer.from(blob.plain);
  }

  has(digest: Buffer): boolean {
    return this.durable.has(digest.toString('hex'));
  }

  locate(digest: Buffer): BlobLocation | undefined {
    const blob = this.durable.get(digest.toString('hex'));
    return blob ? { ...blob.location } : undefined;
  }

  stats(): { packs: number; blobs: number; bytes: number } {
    return { packs: this.backing.packSeq, blobs: this.durable.size, bytes: this.backing.bytes };
  }

  async close(): Promise<void> {
    this.closed = true;
    this.writers.clear();
  }

  /** An aborted writer's blobs never became durable here, so nothing is pending at a start. */
  async resolvePending(): Promise<PendingCleanup> {
    return { removedPacks: [], removedBytes: 0, settledPacks: 0 };
  }

  /** Flip one byte of a durable blob so the next get fails its re-hash. */
  corruptForTest(digest: Buffer, byteOffset = 0): void {
    const blob = this.durable.get(digest.toString('hex'));
    if (!blob) throw new BlocksnapError('E_NOT_FOUND', `blob ${digest.toString('hex')} not found`);
    blob.plain[byteOffset] ^= 0xff;
  }

  /** @internal used by MemoryBlobWriter */
  isKnown(hex: string): boolean {
    if (this.durable.has(hex)) return true;
    for (const w of this.writers) if (w.hasPending(hex)) return true;
    return false;
  }

  /** @internal */
  commit(pending: Map<string, PendingBlob>): number {
    const fresh = [...pending].filter(([hex]) => !this.durable.has(hex)); // another writer may have flushed it first
    if (fresh.length === 0) return 0;
    const pack = `mem-${(++this.backing.packSeq).toString().padStart(8, '0')}`;
    let offset = 16;
    let written = 0;
    for (const [hex, p] of fresh) {
      this.durable.set(hex, {
        plain: p.plain,
        location: { pack, offset, storedLength: p.storedLength, plainLength: p.plain.length, type: p.type, codec: 0 },
      });
      offset += p.storedLength;
      written += p.storedLength;
    }
    this.backing.bytes += written;
    return written;
  }

  /** @internal */
  release(w: MemoryBlobWriter): void {
    this.writers.delete(w);
  }

  /** @internal */
  checkOpen(): void {
    if (this.closed) throw new BlocksnapError('E_STORE_IO', 'chunk store is closed');
  }
}

class MemoryBlobWriter implements BlobWriter {
  private pending = new Map<string, PendingBlob>();
  /**
   * Blobs de-duplicated against another writer's unflushed ones: this writer's
   * flush makes them durable even if that writer aborts (the contract), so it
   * keeps its own copy until then.
   */
  private borrowed = new Map<string, PendingBlob>();
  private done = false;

  constructor(private readonly store: MemoryChunkStore) {}

  hasPending(hex: string): boolean {
    return this.pending.has(hex);
  }

  async put(type: BlobType, digest: Buffer, plain: Buffer, compressed?: Buffer): Promise<PutResult> {
    this.checkUsable();
    if (digest.length !== 32) throw new BlocksnapError('E_STORE_IO', `digest is ${digest.length} bytes`);
    if (digest.equals(ZERO_DIGEST) || isAllZero(plain)) {
      throw new BlocksnapError('E_STORE_IO', 'refusing to store an all-zero blob: record ZERO instead');
    }
    const hex = digest.toString('hex');
    // Like a pack: the caller's frame if it is smaller, else the plain bytes.
    const storedLength = compressed && compressed.length < plain.length ? compressed.length : plain.length;
    if (this.store.isKnown(hex)) {
      // Copy: the caller may reuse its buffer once put resolved.
      if (!this.store.has(digest) && !this.pending.has(hex)) this.borrowed.set(hex, { type, plain: Buffer.from(plain), storedLength });
      return { stored: false, storedBytes: 0 };
    }
    this.pending.set(hex, { type, plain: Buffer.from(plain), storedLength });
    return { stored: true, storedBytes: storedLength };
  }

  async flush(): Promise<number> {
    this.checkUsable();
    const written = this.store.commit(new Map([...this.borrowed, ...this.pending]));
    this.pending = new Map();
    this.borrowed = new Map();
    return written;
  }

  async abort(_opts?: { uncommitted?: boolean }): Promise<void> {
    this.pending = new Map();
    this.borrowed = new Map();
    this.done = true;
    this.store.release(this);
  }

  private checkUsable(): void {
    this.store.checkOpen();
    if (this.done) throw new BlocksnapError('E_STORE_IO', 'blob writer was aborted');
  }
}
