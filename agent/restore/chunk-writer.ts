import { createHash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { BlocksnapError } from '../../proto/errors.js';
import { DIGEST_BYTES } from '../../proto/shared/image-root.js';
import { zstdDecompress } from '../../proto/shared/zstd.js';
import type { RestoreChunks } from './restore-session.js';
import { RestoreWorkers } from './restore-workers.js';
import { sliceFrom } from './slice-from.js';

/**
 * Checks and writes the chunks of one restore (DESIGN.md §4.6). Every chunk
 * must be one the agent asked for, not yet written, carry the map's digest
 * and the chunk's real length, decompress to exactly that length and hash to
 * the digest (E_DIGEST_MISMATCH otherwise: nothing of that batch is written).
 * Runs of consecutive chunks go out as one positional write.
 *
 * With `workers` > 0 the decompression, SHA-256 and write of a batch run in
 * a worker thread (restore-worker.ts; the main thread keeps the bookkeeping
 * checks and the socket), as the backup's reader does: on the main thread
 * they cost more CPU than the session itself and left it the bottleneck.
 * `workers` = 0 does it all here (unit tests, and a measured comparison).
 */
export class ChunkWriter {
  /** Chunks written so far (of the wanted ones). */
  written = 0;
  bytesWritten = 0;
  /** Batches handed to a worker in their received message, uncopied (for tests and the bench). */
  transferred = 0;
  private readonly done: Uint8Array;
  private readonly pool: RestoreWorkers | null;

  constructor(
    private readonly handle: FileHandle,
    private readonly volumeSize: number,
    private readonly chunkSize: number,
    private readonly digests: Buffer,
    /** The chunks asked for: bit set = expected once. */
    private readonly wanted: (index: number) => boolean,
    chunkCount: number,
    workers = 0,
    /** Plain bytes of a batch a worker keeps between check and write (tests make it small to reach the second-pass path). */
    keepBytes?: number,
  ) {
    this.done = new Uint8Array(chunkCount);
    this.pool = workers > 0 ? new RestoreWorkers(workers, { fd: handle.fd, keepBytes }) : null;
  }

  /** Stops the worker threads (after the last write resolved). */
  async close(): Promise<void> {
    await this.pool?.close();
  }

  /**
   * Verifies the whole batch, then writes it; resolves when the bytes are
   * handed to the kernel.
   */
  async write(batch: RestoreChunks): Promise<void> {
    const runs: { offset: number; total: number; chunks: { c: RestoreChunks['chunks'][number]; length: number }[] }[] = [];
    let prev = -2;
    for (const c of batch.chunks) {
      const i = c.index;
      if (!Number.isSafeInteger(i) || i < 0 || i >= this.done.length || !this.wanted(i)) {
        throw new BlocksnapError('E_PROTOCOL', `the appliance sent chunk ${i}, which was not asked for`);
      }
      if (this.done[i] || i === prev) throw new BlocksnapError('E_PROTOCOL', `the appliance sent chunk ${i} twice`);
      const expected = this.digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
      const length = Math.min(this.chunkSize, this.volumeSize - i * this.chunkSize);
      if (c.zero || !expected.equals(c.digest) || c.plainLength !== length) {
        throw new BlocksnapError('E_DIGEST_MISMATCH', `chunk ${i}: the appliance sent another chunk than the image map names (digest, length or zero flag differ)`);
      }
      const last = runs[runs.length - 1];
      if (last && i === prev + 1) {
        last.chunks.push({ c, length });
        last.total += length;
      } else {
        runs.push({ offset: i * this.chunkSize, total: length, chunks: [{ c, length }] });
      }
      prev = i;
    }
    if (this.pool) return this.writeInWorker(batch);
    const out: { offset: number; buf: Buffer }[] = [];
    for (const r of runs) {
      // One spare byte: zstdDecompress detects data longer than declared by filling it.
      const buf = Buffer.allocUnsafe(r.total + 1);
      let pos = 0;
      for (const { c, length } of r.chunks) {
        const i = c.index;
        let plain: Buffer;
        try {
          plain = zstdDecompress(c.data, length, buf.subarray(pos));
        } catch (e) {
          throw new BlocksnapError('E_DIGEST_MISMATCH', `chunk ${i}: its data does not decompress to ${length} bytes: ${(e as Error).message}`, { cause: e });
        }
        const expected = this.digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
        if (!createHash('sha256').update(plain).digest().equals(expected)) {
          throw new BlocksnapError('E_DIGEST_MISMATCH', `chunk ${i}: SHA-256 of the received data is not the image's digest ${expected.toString('hex')}`);
        }
        pos += length;
      }
      out.push({ offset: r.offset, buf: buf.subarray(0, r.total) });
    }
    for (const c of batch.chunks) this.done[c.index] = 1;
    await Promise.all(out.map((r) => this.writeRun(r.offset, [r.buf])));
    this.written += batch.chunks.length;
  }

  /**
   * The batch checked + written by a worker. The frames go to it in the
   * received WebSocket message itself when this batch owns that message's
   * whole ArrayBuffer (transferred: no copy; see ownedMessage), else copied
   * into one transferable buffer. Its chunks count as taken from now on, so
   * a later batch repeating one is refused while this one is in flight.
   * After the call the batch's buffers may be detached: nothing reads them.
   */
  private async writeInWorker(batch: RestoreChunks): Promise<void> {
    const n = batch.chunks.length;
    const digests = Buffer.allocUnsafeSlow(n * DIGEST_BYTES);
    const index = new Float64Array(n);
    const frameAt = new Uint32Array(n);
    const frameLen = new Uint32Array(n);
    const plainLen = new Uint32Array(n);
    const owned = ownedMessage(batch);
    let data = owned;
    let pos = 0;
    batch.chunks.forEach((c, k) => {
      digests.set(c.digest, k * DIGEST_BYTES);
      index[k] = c.index;
      frameAt[k] = data ? c.data.byteOffset : pos;
      frameLen[k] = c.data.length;
      plainLen[k] = c.plainLength;
      pos += c.data.length;
      this.done[c.index] = 1;
    });
    if (!data) {
      const copy = Buffer.allocUnsafeSlow(pos);
      pos = 0;
      for (const c of batch.chunks) {
        copy.set(c.data, pos);
        pos += c.data.length;
      }
      data = copy.buffer as ArrayBuffer;
    }
    if (owned) this.transferred++;
    const reply = await this.pool!.run({
      seq: batch.seq, data, frameAt, index, frameLen, plainLen, digests: digests.buffer as ArrayBuffer, chunkSize: this.chunkSize,
    });
    if (!reply.ok) {
      for (let k = 0; k < n; k++) this.done[index[k]!] = 0;
      throw new BlocksnapError(reply.code, reply.message);
    }
    this.bytesWritten += reply.bytesWritten;
    this.written += n;
  }

  private async writeRun(offset: number, bufs: Buffer[]): Promise<void> {
    let total = 0;
    for (const b of bufs) total += b.length;
    let done = 0;
    while (done < total) {
      const { bytesWritten } = await this.handle.writev(sliceFrom(bufs, done), offset + done);
      if (bytesWritten <= 0) throw new BlocksnapError('E_DEVICE', `write at ${offset + done} wrote nothing`);
      done += bytesWritten;
    }
    this.bytesWritten += total;
  }
}

/**
 * The ArrayBuffer of the message a batch was decoded from, when the batch may
 * give it away: every chunk's data lies in it, and it holds exactly one
 * frame (its first 4 bytes are the frame length, + 4 = its size) — the ws
 * receiver assembles a message of more than one socket read in a buffer of
 * its own (Buffer.allocUnsafe of the payload size, above Node's pool), so
 * nothing else is in it and nobody else reads it after the decode. A batch
 * decoded from a shared buffer (a socket read holding more than this frame,
 * Node's pool, a test's buffer) gets null and is copied.
 */
function ownedMessage(batch: RestoreChunks): ArrayBuffer | null {
  const first = batch.chunks[0]?.data;
  if (!first) return null;
  const ab = first.buffer;
  if (!(ab instanceof ArrayBuffer) || ab.byteLength <= Buffer.poolSize || ab.byteLength < 4) return null;
  if (new DataView(ab).getUint32(0, true) + 4 !== ab.byteLength) return null;
  for (const c of batch.chunks) if (c.data.buffer !== ab) return null;
  return ab;
}
