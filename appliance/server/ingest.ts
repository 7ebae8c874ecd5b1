import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { BlocksnapError } from '../../proto/errors.js';
import { assertChunkSize, chunkCountOf } from '../../proto/shared/volume-geometry.js';
import { BLOB_CHUNK, ZERO_DIGEST, type BlobWriter, type ChunkStore } from '../store/chunk-store.js';
import { ImageIndexBuilder } from '../store/image-index.js';
import { zstdDecompress } from '../../proto/shared/zstd.js';
import { assertReferencesPresent } from '../retention/reference-check.js';

/**
 * The appliance side of one volume transfer: checks every chunk, stores it,
 * and patches the image map. One Ingest per job; it owns its BlobWriter and
 * its ImageIndexBuilder (DESIGN.md §4.3), so jobs never share an open pack.
 *
 * `durableNext` is the resume point we promise the agent: every chunk below
 * it that the agent sent is in a flushed pack. Because chunks arrive in
 * increasing index order, that watermark is a single number.
 */
/** 2^30 chunks: 64 TiB at 64 KiB chunks, a 32 MiB root. */
export const MAX_CHUNKS = 2 ** 30;

export interface IngestChunk {
  index: number;
  digest: Uint8Array;
  zero: boolean;
  data: Uint8Array;
  plainLength: number;
}

export interface IngestParams {
  jobId: string;
  volumeSize: number;
  chunkSize: number;
  mode: 'full' | 'incremental';
  basisRootDigest?: Buffer;
  /** Flush (make durable and advance durableNext) after this many stored bytes. */
  flushEveryBytes?: number;
  /** The job's last batch seq before this volume (a later member of a group: one seq per job). */
  startSeq?: number;
}

export interface IngestStats {
  chunksReceived: number;
  chunksZero: number;
  chunksStored: number;
  bytesReceived: number;
  bytesStored: number;
  pagesWritten: number;
  pagesShared: number;
}

export class Ingest {
  readonly chunkCount: number;
  private readonly writer: BlobWriter;
  private readonly builder: ImageIndexBuilder;
  /** The store's GC sweep epoch when this ingest opened (DESIGN.md §12.3). */
  private readonly sweepEpoch: number | undefined;
  private nextIndex = 0;
  private durable = 0;
  private lastSeq = 0;
  private unflushedBytes = 0;
  private closed = false;
  private aborted = false;
  private seqJumpAllowed = false;
  /** Decompression target reused for every chunk (the store copies what it keeps before put resolves). */
  private readonly scratch: Buffer;
  readonly stats: IngestStats = {
    chunksReceived: 0, chunksZero: 0, chunksStored: 0, bytesReceived: 0, bytesStored: 0, pagesWritten: 0, pagesShared: 0,
  };

  /** Opens an ingest; a basis that cannot be loaded or does not fit fails here, before any chunk is accepted. */
  static async open(store: ChunkStore, params: IngestParams, log: Logger): Promise<Ingest> {
    const ingest = new Ingest(store, params, log);
    try {
      await ingest.builder.ready();
    } catch (e) {
      await ingest.abort();
      throw e;
    }
    return ingest;
  }

  private readonly store: ChunkStore;

  private constructor(
    store: ChunkStore,
    readonly params: IngestParams,
    private readonly log: Logger,
  ) {
    if (!Number.isSafeInteger(params.volumeSize) || params.volumeSize <= 0) {
      throw new BlocksnapError('E_PROTOCOL', `invalid volume size ${params.volumeSize}`);
    }
    const cs = params.chunkSize;
    assertChunkSize(cs, 'E_PROTOCOL');
    this.chunkCount = chunkCountOf(params.volumeSize, cs);
    this.scratch = Buffer.allocUnsafe(cs + 1);
    this.lastSeq = params.startSeq ?? 0;
    if (this.chunkCount > MAX_CHUNKS) {
      // The map's root grows with the chunk count: bound what one frame can make us allocate.
      throw new BlocksnapError('E_PROTOCOL', `volume of ${params.volumeSize} bytes has ${this.chunkCount} chunks (max ${MAX_CHUNKS})`);
    }
    this.writer = store.openWriter();
    this.sweepEpoch = store.sweepEpoch;
    this.store = store;
    this.builder = new ImageIndexBuilder({
      store,
      writer: this.writer,
      volumeSize: params.volumeSize,
      chunkSize: cs,
      basis: params.mode === 'incremental' && params.basisRootDigest ? { rootDigest: params.basisRootDigest } : undefined,
    });
  }

  get durableNext(): number {
    return this.durable;
  }

  get seq(): number {
    return this.lastSeq;
  }

  /** True once finish() sealed the map (or abort() ran). */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Checks and stores one batch. Any error leaves the ingest unusable: the caller aborts the job. */
  async addBatch(seq: number, chunks: IngestChunk[]): Promise<void> {
    this.assertOpen();
    if (this.seqJumpAllowed && seq > this.lastSeq) {
      // First batch after a resume: the agent numbers on from what it sent, we from what we processed.
      this.seqJumpAllowed = false;
    } else if (seq !== this.lastSeq + 1) {
      throw new BlocksnapError('E_PROTOCOL', `job ${this.params.jobId}: batch seq ${seq}, expected ${this.lastSeq + 1}`);
    }
    for (const c of chunks) await this.addChunk(c);
    this.lastSeq = seq;
    if (this.unflushedBytes >= (this.params.flushEveryBytes ?? 64 * 1024 * 1024)) await this.flush();
  }

  private async addChunk(c: IngestChunk): Promise<void> {
    const { index } = c;
    if (!Number.isSafeInteger(index) || index < this.nextIndex) {
      throw new BlocksnapError('E_CHUNK_RANGE', `chunk ${index} out of order (next allowed ${this.nextIndex})`);
    }
    if (index >= this.chunkCount) {
      throw new BlocksnapError('E_CHUNK_RANGE', `chunk ${index} beyond the volume (${this.chunkCount} chunks)`);
    }
    const expected = Math.min(this.params.chunkSize, this.params.volumeSize - index * this.params.chunkSize);
    if (c.plainLength !== expected) {
      throw new BlocksnapError('E_BAD_CHUNK', `chunk ${index}: plain length ${c.plainLength}, expected ${expected}`);
    }
    this.stats.chunksReceived++;
    this.stats.bytesReceived += c.data.length;
    let digest: Buffer = ZERO_DIGEST;
    if (c.zero) {
      if (c.data.length !== 0) throw new BlocksnapError('E_BAD_CHUNK', `chunk ${index}: zero chunk carries data`);
      this.stats.chunksZero++;
    } else {
      if (c.digest.length !== 32) throw new BlocksnapError('E_BAD_CHUNK', `chunk ${index}: digest is ${c.digest.length} bytes`);
      const data = Buffer.from(c.data.buffer, c.data.byteOffset, c.data.byteLength);
      let plain: Buffer;
      try {
        plain = zstdDecompress(data, expected, this.scratch);
      } catch (e) {
        throw new BlocksnapError('E_BAD_CHUNK', `chunk ${index}: ${(e as Error).message}`, { cause: e });
      }
      const actual = createHash('sha256').update(plain).digest();
      if (!actual.equals(c.digest)) {
        throw new BlocksnapError('E_DIGEST_MISMATCH', `chunk ${index}: data does not match its digest`);
      }
      if (isZero(plain)) {
        // An agent may send a zero chunk as data; it is stored as ZERO like any other.
        this.stats.chunksZero++;
      } else {
        digest = actual;
        // The agent's frame is stored as is, or the plain bytes when it is no smaller: never compressed twice.
        const r = await this.writer.put(BLOB_CHUNK, digest, plain, data);
        if (r.stored) {
          this.stats.chunksStored++;
          this.stats.bytesStored += r.storedBytes;
          this.unflushedBytes += r.storedBytes;
        }
      }
    }
    await this.builder.set(index, digest);
    this.nextIndex = index + 1;
  }

  /**
   * Stores a blob that belongs to the image but not to its chunk map (a WAL
   * piece): verified like a chunk, durable with the image at finish().
   */
  async putExtra(what: string, digest: Uint8Array, data: Uint8Array, plainLength: number): Promise<{ zero: boolean }> {
    this.assertOpen();
    const frame = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    let plain: Buffer;
    try {
      plain = zstdDecompress(frame, plainLength);
    } catch (e) {
      throw new BlocksnapError('E_BAD_CHUNK', `${what}: ${(e as Error).message}`, { cause: e });
    }
    const actual = createHash('sha256').update(plain).digest();
    if (!actual.equals(digest)) throw new BlocksnapError('E_DIGEST_MISMATCH', `${what}: data does not match its digest`);
    if (isZero(plain)) return { zero: true }; // the store never holds zeros; the caller records ZERO
    const r = await this.writer.put(BLOB_CHUNK, actual, plain, frame);
    if (r.stored) {
      this.stats.bytesStored += r.storedBytes;
      this.unflushedBytes += r.storedBytes;
    }
    return { zero: false };
  }

  /** A resumed transfer restarts at durableNext; its first batch may skip seq numbers lost with the connection. */
  resumed(): void {
    this.seqJumpAllowed = true;
  }

  /** Makes everything received so far durable and advances durableNext. */
  async flush(): Promise<void> {
    this.assertOpen();
    await this.writer.flush();
    this.unflushedBytes = 0;
    this.durable = this.nextIndex;
  }

  /**
   * Seals the map: every page and the root are durable when this resolves.
   * The root the ingest built must be `expectedRoot`, the one the agent
   * computed from what it read (basis map + every chunk it sent): a batch
   * lost, duplicated or reordered anywhere between the agent's reader and
   * our store, or an agent digest map that is not the basis, shows here as
   * E_INTEGRITY, before anything is made durable or visible.
   */
  async finish(nextIndex: number, expectedRoot: Uint8Array): Promise<{ rootDigest: Buffer }> {
    this.assertOpen();
    if (nextIndex !== this.chunkCount) {
      throw new BlocksnapError('E_PROTOCOL', `job ${this.params.jobId}: volume ended at chunk ${nextIndex} of ${this.chunkCount}`);
    }
    const r = await this.builder.finish();
    if (!r.rootDigest.equals(expectedRoot)) {
      throw new BlocksnapError('E_INTEGRITY',
        `job ${this.params.jobId}: the image built here (root ${r.rootDigest.toString('hex').slice(0, 16)}…) is not the image the agent read `
        + `(root ${Buffer.from(expectedRoot).toString('hex').slice(0, 16) || '(none)'}…); nothing was committed`);
    }
    this.stats.pagesWritten = r.pagesWritten;
    this.stats.pagesShared = r.pagesShared;
    await this.writer.flush();
    if (this.store.sweepEpoch !== this.sweepEpoch) {
      // A GC swept while this job ran: prove the map before it can be committed (its packs are
      // pending, so a failure here is cleaned by the job's abort like any other).
      await assertReferencesPresent(this.store, r.rootDigest, `job ${this.params.jobId}`);
    }
    this.durable = this.chunkCount;
    this.closed = true;
    return { rootDigest: r.rootDigest };
  }

  /**
   * The job failed before its commit point: drop what this ingest wrote.
   * Also after finish() (a group member whose set never committed, a job
   * refused at its root check): its sealed packs are garbage now, not at the
   * next start.
   */
  async abort(): Promise<void> {
    if (this.aborted) return;
    this.aborted = true;
    this.closed = true;
    await this.writer.abort({ uncommitted: true }).catch((e) => this.log.warn({ err: e, job: this.params.jobId }, 'ingest abort failed'));
  }

  private assertOpen(): void {
    if (this.closed) throw new BlocksnapError('E_PROTOCOL', `job ${this.params.jobId}: transfer already closed`);
  }
}

const ZEROS = Buffer.alloc(4 * 1024 * 1024);

function isZero(b: Buffer): boolean {
  // memcmp against a static zero buffer: the cheapest zero test in Node.
  return b.equals(ZEROS.subarray(0, b.length));
}
