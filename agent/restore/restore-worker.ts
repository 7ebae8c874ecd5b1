/**
 * Worker thread of a restore's ChunkWriter (DESIGN.md §4.6): one task = one
 * RestoreChunks batch whose chunks the main thread has already matched to
 * the map (asked for, not yet written, the map's digest and length). Here
 * every chunk is decompressed with its plain length as the limit and its
 * SHA-256 compared with the map's digest; only when the whole batch checks
 * are its runs of consecutive chunks written, each with one positional
 * writev (nothing of a failing batch is written). A frame of raw blocks (a
 * chunk the appliance stores plain) is not run through the decoder: its
 * bytes are hashed and written where they lie in the received message
 * (raw-frame-view.ts), which the main thread transfers here uncopied.
 *
 * The plain bytes of a batch are kept for the write when they fit in
 * KEEP_BYTES (always, for incompressible data: a batch is ~2 MiB of frames);
 * a batch of very compressible chunks is decompressed a second time while
 * writing instead of holding it all (its frames were checked in the first
 * pass and do not change in between). The file descriptor belongs to the
 * main thread (a terminated worker runs no cleanup code).
 */
import { createHash } from 'node:crypto';
import { writevSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { RESTORE_WORKER_KEEP_BYTES } from '../../proto/shared/restore-protocol.js';
import { zstdDecompress } from '../../proto/shared/zstd.js';
import { rawFrameView } from './raw-frame-view.js';
import { sliceFrom } from './slice-from.js';

export interface RestoreWorkerConfig {
  fd: number;
  /** Plain bytes of a batch kept between check and write (default 64 MiB; tests make it small). */
  keepBytes?: number;
}

export interface RestoreTask {
  seq: number;
  /** The batch's zstd frames: back to back, or where `frameAt` says (the received message itself). */
  data: ArrayBuffer;
  /** Per chunk: where its frame starts in `data` (absent: back to back). */
  frameAt?: Uint32Array;
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

const KEEP_BYTES = RESTORE_WORKER_KEEP_BYTES;
/** Buffers per writev (Linux IOV_MAX). */
const IOV_MAX = 1024;

class Refused extends Error {
  constructor(readonly code: 'E_DIGEST_MISMATCH' | 'E_DEVICE', message: string, readonly errno?: string) {
    super(message);
  }
}

function run(cfg: RestoreWorkerConfig): void {
  let scratch = Buffer.allocUnsafeSlow(4 << 20);
  let single = Buffer.allocUnsafeSlow(64 << 10);
  const one = (bytes: number) => {
    if (single.length < bytes) single = Buffer.allocUnsafeSlow(bytes);
    return single;
  };
  const ensure = (bytes: number) => {
    if (scratch.length < bytes) scratch = Buffer.allocUnsafeSlow(bytes);
    return scratch;
  };

  function decompress(t: RestoreTask, k: number, frame: Buffer, dst: Buffer): Buffer {
    const len = t.plainLen[k]!;
    try {
      return zstdDecompress(frame, len, dst);
    } catch (e) {
      throw new Refused('E_DIGEST_MISMATCH', `chunk ${t.index[k]}: its data does not decompress to ${len} bytes: ${(e as Error).message}`);
    }
  }

  /** Writes `bufs` back to back at `position` (a short writev continues where it stopped). */
  function writeAll(bufs: Buffer[], position: number): number {
    let total = 0;
    for (const b of bufs) total += b.length;
    let done = 0;
    let rest = bufs;
    while (done < total) {
      let n: number;
      const iov = rest.length > IOV_MAX ? rest.slice(0, IOV_MAX) : rest;
      try {
        n = writevSync(cfg.fd, iov, position + done);
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        throw new Refused('E_DEVICE', `write at ${position + done}: ${err.message}`, err.code);
      }
      if (n <= 0) throw new Refused('E_DEVICE', `write at ${position + done} wrote nothing`);
      done += n;
      rest = sliceFrom(rest, n);
    }
    return done;
  }

  function processTask(t: RestoreTask): number {
    const n = t.index.length;
    const data = Buffer.from(t.data);
    const digests = Buffer.from(t.digests);
    const frameAt = new Array<number>(n);
    for (let k = 0, pos = 0; k < n; pos += t.frameLen[k]!, k++) frameAt[k] = t.frameAt ? t.frameAt[k]! : pos;
    const frame = (k: number) => data.subarray(frameAt[k]!, frameAt[k]! + t.frameLen[k]!);
    // Frames of raw blocks are used where they lie (rawFrameView); only the others are decompressed.
    const parts = new Array<Buffer[] | null>(n);
    let decodedTotal = 0;
    let decodedMax = 0;
    for (let k = 0; k < n; k++) {
      parts[k] = rawFrameView(frame(k), t.plainLen[k]!);
      if (!parts[k]) {
        decodedTotal += t.plainLen[k]!;
        decodedMax = Math.max(decodedMax, t.plainLen[k]!);
      }
    }
    const keep = decodedTotal <= (cfg.keepBytes ?? KEEP_BYTES);
    // One spare byte after the last chunk: zstdDecompress detects data longer than declared by filling it.
    const buf = keep ? ensure(decodedTotal + 1) : one(decodedMax + 1);
    let pos = 0;
    for (let k = 0; k < n; k++) {
      const h = createHash('sha256');
      let p = parts[k];
      if (p) {
        for (const b of p) h.update(b);
      } else {
        const plain = decompress(t, k, frame(k), keep ? buf.subarray(pos) : buf);
        h.update(plain);
        if (keep) {
          parts[k] = p = [plain];
          pos += plain.length;
        }
      }
      const expected = digests.subarray(k * 32, k * 32 + 32);
      if (!h.digest().equals(expected)) {
        throw new Refused('E_DIGEST_MISMATCH', `chunk ${t.index[k]}: SHA-256 of the received data is not the image's digest ${expected.toString('hex')}`);
      }
    }
    // The whole batch checks: write each run of consecutive chunks with one writev
    // (a chunk decompressed a second time goes alone: it reuses one buffer).
    let written = 0;
    let iov: Buffer[] = [];
    let at = 0;
    let next = -1;
    const flush = () => {
      if (iov.length > 0) written += writeAll(iov, at);
      iov = [];
    };
    for (let k = 0; k < n; k++) {
      const i = t.index[k]!;
      const p = parts[k] ?? null;
      if (!p) {
        flush();
        written += writeAll([decompress(t, k, frame(k), buf)], i * t.chunkSize);
        next = -1;
        continue;
      }
      if (i !== next) {
        flush();
        at = i * t.chunkSize;
      }
      for (const b of p) iov.push(b);
      next = i + 1;
    }
    flush();
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

