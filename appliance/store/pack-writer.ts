/**
 * Writes one pack file (layout in pack-format.ts): a temp file in store/tmp,
 * payloads appended through a staging buffer with positional writes (many
 * small blobs become a few large writes, no per-blob fsync), then trailer +
 * footer, fsync, rename to packs/HH/<sha256-of-file>.pack and fsync of HH.
 *
 * `append` copies the payload before it returns, so the caller may reuse its
 * buffer at once; the promise it returns only applies back-pressure (it
 * settles when the staged bytes it sent reached the file).
 */
import { createHash, randomUUID, type Hash } from 'node:crypto';
import { close, fchmodSync, fsync, openSync, write } from 'node:fs';
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { BlocksnapError } from '../../proto/errors.js';
import type { BlobType } from './chunk-store.js';
import {
  encodeFooter,
  encodeHeader,
  encodeTrailer,
  FOOTER_SIZE,
  MAX_STORED_LENGTH,
  packRelPath,
  trailerChecksum,
  TRAILER_ENTRY_SIZE,
  type Codec,
  type TrailerEntry,
} from './pack-format.js';
import { fsyncDir, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE } from '../../proto/shared/durable-file.js';

const pwrite = promisify(write);
const pfsync = promisify(fsync);
const pclose = promisify(close);

export const DEFAULT_WRITE_BUFFER = 1024 * 1024;

export interface FinishedPack {
  id: string;
  path: string;
  size: number;
  entries: TrailerEntry[];
}

async function writeAll(fd: number, buf: Buffer, pos: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await pwrite(fd, buf, done, buf.length - done, pos + done);
    if (bytesWritten <= 0) throw new Error(`write returned ${bytesWritten}`);
    done += bytesWritten;
  }
}


function ioError(what: string, path: string, e: unknown): BlocksnapError {
  return new BlocksnapError('E_STORE_IO', `${what} ${path}: ${(e as Error).message}`, { cause: e });
}

export class PackWriter {
  readonly tmpPath: string;
  private readonly fd: number;
  private readonly hash: Hash = createHash('sha256');
  private readonly entries: TrailerEntry[] = [];
  private staging: Buffer;
  private staged = 0;
  private stagedAt: number; // file position of staging[0]
  private end: number; // logical file size so far
  private readonly inflight = new Set<Promise<void>>();
  private failure: BlocksnapError | undefined;
  private sealed = false; // no more appends: finishing, finished or aborted
  private fdClosed = false;
  private removed = false;

  /** Opens the temp file synchronously so a put never waits for it. */
  constructor(
    tmpDir: string,
    private readonly packsDir: string,
    private readonly bufferSize = DEFAULT_WRITE_BUFFER,
  ) {
    this.tmpPath = join(tmpDir, `pack-${process.pid}-${randomUUID()}.tmp`);
    try {
      this.fd = openSync(this.tmpPath, 'wx', PRIVATE_FILE_MODE);
      fchmodSync(this.fd, PRIVATE_FILE_MODE); // whatever the umask (DESIGN.md §2)
    } catch (e) {
      throw ioError('cannot create', this.tmpPath, e);
    }
    const header = encodeHeader();
    this.staging = takeBuffer(Math.max(bufferSize, header.length));
    header.copy(this.staging);
    this.hash.update(header);
    this.staged = header.length;
    this.stagedAt = 0;
    this.end = header.length;
  }

  get count(): number {
    return this.entries.length;
  }

  /** File size if the pack were closed after one more payload of `n` bytes. */
  sizeWith(n: number): number {
    return this.end + n + (this.entries.length + 1) * TRAILER_ENTRY_SIZE + FOOTER_SIZE;
  }

  append(digest: Buffer, type: BlobType, codec: Codec, plainLength: number, payload: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.sealed) throw new BlocksnapError('E_INTERNAL', 'append to a closed pack');
    if (payload.length > MAX_STORED_LENGTH) throw new BlocksnapError('E_STORE_IO', 'blob too large for a pack');
    this.entries.push({ digest: Buffer.from(digest), offset: this.end, storedLength: payload.length, plainLength, type, codec });
    this.hash.update(payload);
    this.end += payload.length;
    let sent: Promise<void> | undefined;
    if (this.staged + payload.length > this.staging.length) {
      sent = this.sendStaging(Math.max(this.bufferSize, payload.length));
    }
    payload.copy(this.staging, this.staged);
    this.staged += payload.length;
    if (this.staged >= this.staging.length) sent = this.sendStaging(this.bufferSize);
    return sent ?? RESOLVED;
  }

  /**
   * Writes trailer and footer, makes the pack durable under its final name.
   * `beforeInstall(id)` runs after the fsync and before the rename: the
   * store journals the pack as pending there (DESIGN.md §5), so no pack
   * appears under packs/ without a record of the writer that made it.
   */
  async finish(beforeInstall?: (id: string) => void): Promise<FinishedPack> {
    if (this.sealed) throw new BlocksnapError('E_INTERNAL', 'pack finished twice');
    this.sealed = true;
    const trailer = encodeTrailer(this.entries);
    const footer = encodeFooter({
      trailerOffset: this.end,
      entryCount: this.entries.length,
      trailerChecksum: trailerChecksum(trailer),
    });
    this.hash.update(trailer).update(footer);
    const tail = Buffer.concat([this.staging.subarray(0, this.staged), trailer, footer]);
    if (this.staging.length === this.bufferSize) recycle(this.staging);
    const size = this.end + trailer.length + footer.length;
    this.track(writeAll(this.fd, tail, this.stagedAt));
    this.staged = 0;
    await this.drain();
    if (this.failure) throw this.failure;
    try {
      await pfsync(this.fd);
    } catch (e) {
      throw ioError('fsync', this.tmpPath, e);
    } finally {
      await this.closeFd();
    }
    const id = this.hash.digest('hex');
    const path = join(this.packsDir, packRelPath(id));
    beforeInstall?.(id);
    try {
      const created = await mkdir(dirname(path), { recursive: true, mode: PRIVATE_DIR_MODE });
      if (created) await fsyncDir(this.packsDir);
      await rename(this.tmpPath, path);
      await fsyncDir(dirname(path));
    } catch (e) {
      throw ioError('cannot install pack', path, e);
    }
    return { id, path, size, entries: this.entries };
  }

  /**
   * Drops the pack: waits for writes in flight, closes and removes the temp
   * file. Also the clean-up after a failed finish (a renamed pack stays).
   */
  async abort(): Promise<void> {
    this.sealed = true;
    if (this.removed) return;
    this.removed = true;
    await this.drain();
    await this.closeFd();
    await rm(this.tmpPath, { force: true });
  }

  private sendStaging(nextSize: number): Promise<void> | undefined {
    if (this.staged === 0) {
      if (this.staging.length < nextSize) this.staging = Buffer.allocUnsafe(nextSize); // an oversized blob
      return undefined;
    }
    const full = this.staging;
    const reuse = full.length === this.bufferSize;
    const p = this.track(writeAll(this.fd, full.subarray(0, this.staged), this.stagedAt).then(() => reuse && recycle(full)));
    this.stagedAt += this.staged;
    this.staging = nextSize === this.bufferSize ? takeBuffer(nextSize) : Buffer.allocUnsafe(nextSize);
    this.staged = 0;
    return p;
  }

  private track(w: Promise<unknown>): Promise<void> {
    const p = w.then(
      () => {
        this.inflight.delete(p);
      },
      (e: unknown) => {
        this.inflight.delete(p);
        this.failure ??= ioError('write', this.tmpPath, e);
        throw this.failure;
      },
    );
    this.inflight.add(p);
    // The failure is kept in `this.failure` and rethrown by the next call, so
    // a send nobody awaits must not become an unhandled rejection.
    p.catch(() => undefined);
    return p;
  }

  private async drain(): Promise<void> {
    await Promise.allSettled([...this.inflight]);
  }

  private async closeFd(): Promise<void> {
    if (this.fdClosed) return;
    this.fdClosed = true;
    await pclose(this.fd).catch(() => undefined);
  }
}

const RESOLVED: Promise<void> = Promise.resolve();

// Staging buffers of the configured size are recycled once written:
// allocating a fresh 1 MiB per MiB stored showed up as page faults and GC
// time on the ingest path. Oversized buffers (a blob larger than the staging
// size) are left to the GC so the pool stays a handful of fixed sizes.
const spareBuffers = new Map<number, Buffer[]>();
const MAX_SPARE_PER_SIZE = 8;

function takeBuffer(size: number): Buffer {
  return spareBuffers.get(size)?.pop() ?? Buffer.allocUnsafe(size);
}

function recycle(buf: Buffer): void {
  let list = spareBuffers.get(buf.length);
  if (!list) spareBuffers.set(buf.length, (list = []));
  if (list.length < MAX_SPARE_PER_SIZE) list.push(buf);
}

export { fsyncDir };
