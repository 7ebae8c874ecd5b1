/**
 * Worker thread of `BlobReadPool` (blob-read-pool.ts): one task = blobs of
 * one pack that a reader wants together (an NBD request's chunks). Frames
 * that lie back to back in the pack are read with one pread; plain frames
 * land straight in the output, zstd frames are decompressed into it with
 * their plain length as the limit; every plain blob's SHA-256 is compared
 * with its digest here, off the main thread. The output (every blob's plain
 * bytes back to back) is transferred to the caller, not copied.
 *
 * The file descriptor belongs to the main thread's pack reader, which keeps
 * it open until the task's reply arrived (a terminated worker runs no cleanup).
 */
import { createHash } from 'node:crypto';
import { readSync } from 'node:fs';
import { parentPort } from 'node:worker_threads';
import { zstdDecompress } from '../../proto/shared/zstd.js';

export interface BlobReadTask {
  seq: number;
  fd: number;
  /** Per blob: offset in the pack, stored length, plain length, codec (0 plain, 1 zstd); digests 32 bytes each. */
  offset: Float64Array;
  stored: Uint32Array;
  plain: Uint32Array;
  codec: Uint8Array;
  digests: Uint8Array;
}

/** `bad`: blobs that failed (read, decompress or digest) with why; the caller re-reads them the slow way. */
export interface BlobReadReply {
  seq: number;
  out: ArrayBuffer;
  bad: Array<{ k: number; why: string }>;
}

const CODEC_NONE = 0;

function readAll(fd: number, dst: Buffer, position: number): void {
  let done = 0;
  while (done < dst.length) {
    const n = readSync(fd, dst, done, dst.length - done, position + done);
    if (n === 0) throw new Error(`short read: ${dst.length} bytes at ${position}, file ends first`);
    done += n;
  }
}

let scratch = Buffer.allocUnsafeSlow(1 << 20);

export function runTask(t: BlobReadTask): BlobReadReply {
  const n = t.offset.length;
  let total = 0;
  for (let k = 0; k < n; k++) total += t.plain[k]!;
  // One spare byte: zstdDecompress needs it to tell "longer than declared" apart.
  const out = Buffer.allocUnsafeSlow(total + 1);
  const at = new Array<number>(n);
  for (let k = 0, pos = 0; k < n; k++) { at[k] = pos; pos += t.plain[k]!; }
  const bad: BlobReadReply['bad'] = [];
  const failed = new Set<number>();
  // Runs of blobs with one codec, back to back in the pack: one pread each.
  for (let k = 0; k < n;) {
    let j = k + 1;
    while (j < n && t.codec[j] === t.codec[k] && t.offset[j] === t.offset[j - 1]! + t.stored[j - 1]!) j++;
    const len = t.offset[j - 1]! + t.stored[j - 1]! - t.offset[k]!;
    try {
      if (t.codec[k] === CODEC_NONE) {
        let ok = true;
        for (let i = k; i < j; i++) if (t.stored[i] !== t.plain[i]) ok = false;
        if (!ok) throw new Error('a plain blob whose stored and plain lengths differ');
        readAll(t.fd, out.subarray(at[k]!, at[k]! + len), t.offset[k]!);
      } else {
        if (scratch.length < len) scratch = Buffer.allocUnsafeSlow(len);
        readAll(t.fd, scratch.subarray(0, len), t.offset[k]!);
        for (let i = k, p = 0; i < j; p += t.stored[i]!, i++) {
          try {
            // Decompressed in order: the spare byte past blob i is blob i+1's first, written next.
            zstdDecompress(scratch.subarray(p, p + t.stored[i]!), t.plain[i]!, out.subarray(at[i]!, at[i]! + t.plain[i]! + 1));
          } catch (e) {
            failed.add(i);
            bad.push({ k: i, why: `does not decompress: ${(e as Error).message}` });
          }
        }
      }
    } catch (e) {
      for (let i = k; i < j; i++) { failed.add(i); bad.push({ k: i, why: (e as Error).message }); }
    }
    k = j;
  }
  const digests = Buffer.from(t.digests.buffer, t.digests.byteOffset, t.digests.byteLength);
  for (let k = 0; k < n; k++) {
    if (failed.has(k)) continue;
    const sum = createHash('sha256').update(out.subarray(at[k]!, at[k]! + t.plain[k]!)).digest();
    if (!sum.equals(digests.subarray(32 * k, 32 * k + 32))) bad.push({ k, why: 'fails its digest' });
  }
  return { seq: t.seq, out: out.buffer as ArrayBuffer, bad };
}

parentPort?.on('message', (t: BlobReadTask) => {
  const r = runTask(t);
  parentPort!.postMessage(r, [r.out]);
});
// Loaded (under tsx that takes seconds): the pool sends tasks from now on.
parentPort?.postMessage({ ready: true });
