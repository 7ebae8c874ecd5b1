/**
 * Worker thread of a restore's ChunkWriter (DESIGN.md §4.6): one task = one
 * RestoreChunks batch whose chunks the main thread has already matched to
 * the map (asked for, not yet written, the map's digest and length). Here
 * every chunk is decompressed with its plain length as the limit and its
 * SHA-256 compared with the map's digest; only when the whole batch checks
 * are its runs of consecutive chunks written, each with one positional
 * write (nothing of a failing batch is written).
 *
 * The plain bytes of a batch are kept for the write when they fit in
 * KEEP_BYTES (always, for incompressible data: a batch is ~2 MiB of frames);
 * a batch of very compressible chunks is decompressed a second time while
 * writing instead of holding it all (its frames were checked in the first
 * pass and do not change in between). The file descriptor belongs to the
 * main thread (a terminated worker runs no cleanup code).
 */
import { createHash } from 'node:crypto';
import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { zstdDecompress } from '../../proto/shared/zstd.js';

export interface RestoreWorkerConfig {
  fd: number;
  /** Plain bytes of a batch kept between check and write (default 64 MiB; tests make it small). */
  keepBytes?: number;
}

export interface RestoreTask {
  seq: number;
  /** The batch's zstd frames back to back. */
  data: ArrayBuffer;
  /** Per chunk: index, frame length, plain length; digests 32 bytes each. */
  index: Float64Array;
  frameLen: Uint32Array;
  plainLen: Uint32Array;
  digests: ArrayBuffer;
  chunkSize: number;
}

export type RestoreTaskReply =
  | { seq: number; ok: true; bytesWritten: number }
  | { seq: number; ok: false; code: 'E_DIGEST_MISMATCH' | 'E_DEVICE' | 'E_INTERNAL'; message: string; errno?: string };

const KEEP_BYTES = 64 << 20;

class Refused extends Error {
  constructor(readonly code: 'E_DIGEST_MISMATCH' | 'E_DEVICE', message: string, readonly errno?: string) {
    super(message);
  }
}

function run(cfg: RestoreWorkerConfig): void {
  let scratch = Buffer.allocUnsafeSlow(4 << 20);
  const one = () => scratch;
  const ensure = (bytes: number) => {
    if (scratch.length < bytes) scratch = Buffer.allocUnsafeSlow(bytes);
    return scratch;
  };

  function decompress(t: RestoreTask, k: number, frames: Buffer, dst: Buffer): Buffer {
    const len = t.plainLen[k]!;
    try {
      return zstdDecompress(frames, len, dst);
    } catch (e) {
      throw new Refused('E_DIGEST_MISMATCH', `chunk ${t.index[k]}: its data does not decompress to ${len} bytes: ${(e as Error).message}`);
    }
  }

  function writeAll(buf: Buffer, position: number): number {
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        n = writeSync(cfg.fd, buf, done, buf.length - done, position + done);
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        throw new Refused('E_DEVICE', `write at ${position + done}: ${err.message}`, err.code);
      }
      if (n <= 0) throw new Refused('E_DEVICE', `write at ${position + done} wrote nothing`);
      done += n;
    }
    return done;
  }

  function processTask(t: RestoreTask): number {
    const n = t.index.length;
    const data = Buffer.from(t.data);
    const digests = Buffer.from(t.digests);
    const frameAt = new Array<number>(n + 1);
    frameAt[0] = 0;
    let plainTotal = 0;
    for (let k = 0; k < n; k++) {
      frameAt[k + 1] = frameAt[k]! + t.frameLen[k]!;
      plainTotal += t.plainLen[k]!;
    }
    const keep = plainTotal <= (cfg.keepBytes ?? KEEP_BYTES);
    // One spare byte after the last chunk: zstdDecompress detects data longer than declared by filling it.
    const buf = keep ? ensure(plainTotal + 1) : ensure(Math.max(...t.plainLen) + 1);
    let pos = 0;
    for (let k = 0; k < n; k++) {
      const plain = decompress(t, k, data.subarray(frameAt[k]!, frameAt[k + 1]!), keep ? buf.subarray(pos) : one());
      const expected = digests.subarray(k * 32, k * 32 + 32);
      if (!createHash('sha256').update(plain).digest().equals(expected)) {
        throw new Refused('E_DIGEST_MISMATCH', `chunk ${t.index[k]}: SHA-256 of the received data is not the image's digest ${expected.toString('hex')}`);
      }
      pos += plain.length;
    }
    // The whole batch checks: write each run of consecutive chunks with one write.
    let written = 0;
    if (keep) {
      let k = 0;
      pos = 0;
      while (k < n) {
        let end = k + 1;
        let bytes = t.plainLen[k]!;
        while (end < n && t.index[end] === t.index[end - 1]! + 1) bytes += t.plainLen[end++]!;
        written += writeAll(buf.subarray(pos, pos + bytes), t.index[k]! * t.chunkSize);
        pos += bytes;
        k = end;
      }
    } else {
      for (let k = 0; k < n; k++) {
        const plain = decompress(t, k, data.subarray(frameAt[k]!, frameAt[k + 1]!), one());
        written += writeAll(plain, t.index[k]! * t.chunkSize);
      }
    }
    return written;
  }

  const port = parentPort!;
  port.on('message', (t: RestoreTask) => {
    let reply: RestoreTaskReply;
    try {
      reply = { seq: t.seq, ok: true, bytesWritten: processTask(t) };
    } catch (e) {
      reply = e instanceof Refused
        ? { seq: t.seq, ok: false, code: e.code, message: e.message, errno: e.errno }
        : { seq: t.seq, ok: false, code: 'E_INTERNAL', message: String((e as Error)?.message ?? e) };
    }
    port.postMessage(reply);
  });
}

if (parentPort && workerData) run(workerData as RestoreWorkerConfig);
