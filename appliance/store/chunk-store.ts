/**
 * Content-addressed blob storage (chunks, index pages, roots) in pack files.
 *
 * Contract (every implementation passes test/store/chunk-store.contract.ts:
 * FsChunkStore and the tests' MemoryChunkStore; crash recovery is fs-only):
 * - Blobs are addressed by SHA-256 of their plain bytes. `ZERO_DIGEST` is
 *   never stored: `put` of an all-zero payload is refused (E_STORE_IO) — the
 *   caller records ZERO instead.
 * - `openWriter()` gives a writer owned by one ingest. `put` verifies nothing
 *   (the caller verified the digest) but de-duplicates against the index and
 *   every open writer, and returns whether it stored new bytes (a blob
 *   de-duplicated against another writer's unflushed pack is durable after
 *   this writer's flush even if that other writer aborts). A blob put in
 *   a writer is readable through `get` once its pack is durable: a pack that
 *   reached the target size is sealed on its own, the rest when `flush()`
 *   resolved. `flush()` makes every blob put so far durable (pack fsync +
 *   rename + directory fsync + index rows) and returns the number of pack
 *   bytes made durable since the previous flush.
 * - `abort()` drops the unflushed pack (its temp file is removed).
 * - `get(digest)` returns the plain bytes, re-hashed: corruption is
 *   E_STORE_CORRUPT naming pack and digest; a missing blob is E_NOT_FOUND.
 * - `has(digest)` is true only for durable blobs.
 */
import type { PendingCleanup, StoreRecovery } from './fs-chunk-store.js';

export type BlobType = 1 | 2 | 3; // 1 chunk, 2 index page, 3 index root

export const BLOB_CHUNK: BlobType = 1;
export const BLOB_PAGE: BlobType = 2;
export const BLOB_ROOT: BlobType = 3;

export const ZERO_DIGEST: Buffer = Buffer.alloc(32);

export interface PutResult {
  stored: boolean;
  storedBytes: number;
}

export interface BlobWriter {
  /**
   * Store a blob. `compressed`, when given, is a zstd frame of `plain` that
   * the caller already has (the agent's); otherwise the writer compresses.
   */
  put(type: BlobType, digest: Buffer, plain: Buffer, compressed?: Buffer): Promise<PutResult>;
  flush(): Promise<number>;
  /**
   * Drops the unflushed pack. With `uncommitted` the caller knows no image of
   * this writer was committed (its job failed before the commit point, even
   * if it stored a root): flushed packs no other writer depends on go too.
   */
  abort(opts?: { uncommitted?: boolean }): Promise<void>;
}

export interface BlobLocation {
  pack: string;
  offset: number;
  storedLength: number;
  plainLength: number;
  type: BlobType;
  codec: number;
}

export interface ChunkStore {
  openWriter(): BlobWriter;
  get(digest: Buffer): Promise<Buffer>;
  /**
   * `get` of several blobs at once, same checks and errors (optional; the
   * file store reads and re-hashes them in worker threads: the NBD read path).
   */
  getMany?(digests: Buffer[]): Promise<Buffer[]>;
  /**
   * The blob as stored (codec 1: its zstd frame, 0: plain), unverified, for a
   * reader that checks the plain bytes itself (a restore: the agent hashes
   * every chunk) and would otherwise decompress, hash and recompress it.
   * Optional: without it such a reader uses get().
   */
  getStored?(digest: Buffer): Promise<{ codec: number; data: Buffer; plainLength: number }>;
  /**
   * Stored bytes of pack `pack` from `offset` on into `buffers`, back to back
   * (one vectored read for adjacent blobs found with `locate`), unverified as
   * getStored. Optional; it fails if GC moved the blobs meanwhile (the caller
   * then uses getStored, which retries).
   */
  readStoredv?(pack: string, offset: number, buffers: Uint8Array[]): Promise<void>;
  has(digest: Buffer): boolean;
  locate(digest: Buffer): BlobLocation | undefined;
  /** Durable packs, blobs and pack bytes (from the index). */
  stats(): { packs: number; blobs: number; bytes: number };
  /**
   * Bumped by every garbage-collection sweep that removed index rows (stores
   * without a GC leave it undefined): an ingest that sees it change re-checks
   * its map before the commit (DESIGN.md §12.3).
   */
  readonly sweepEpoch?: number;
  close(): Promise<void>;
}

/**
 * A ChunkStore as the appliance runs it (appliance/server/appliance.ts): at
 * open it reports what it found and repaired (DESIGN.md §6.1), and at start
 * it settles the pending-pack journal against the committed roots (§5.2).
 * A store without packs on disk reports nothing and removes nothing.
 */
export interface RecoveringChunkStore extends ChunkStore {
  readonly recovery: StoreRecovery;
  resolvePending(committedRoot: (rootHex: string) => boolean): Promise<PendingCleanup>;
}
