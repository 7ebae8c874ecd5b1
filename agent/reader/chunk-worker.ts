/**
 * Worker thread of the reader pipeline (see chunk-reader.ts for the contract).
 *
 * One task = a contiguous chunk range. For each selected chunk: positional
 * read (one read per run of selected chunks into a reused buffer), zero check,
 * SHA-256, basis comparison, zstd compression into a reused scratch buffer.
 * The result is copied into fresh ArrayBuffers sized to the output and
 * transferred, so the scratch buffers never leave this thread.
 *
 * The file descriptor belongs to the main thread: a terminated worker runs no
 * cleanup code, so an fd opened here would leak on abort.
 */
import { createHash } from 'node:crypto';
import { readSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import binding from 'zstd-napi/binding.js';

export interface WorkerConfig {
  fd: number;
  path: string;
  volumeSize: number;
  chunkSize: number;
  taskChunks: number;
  level: number;
  mode: 'full' | 'incremental';
  /** The fd was opened O_DIRECT: reads must use aligned buffers, offsets and lengths. */
  direct: boolean;
}

export interface ReadTask {
  seq: number;
  first: number;
  count: number;
  /** One byte per chunk of the range: 0 skip, 1 read, SELECT_HOLE known zero (not read); absent = read all. */
  select?: Uint8Array;
  /** count*32 basis digest bytes; absent = no comparison. */
  basis?: Uint8Array;
}

export interface TaskResult {
  seq: number;
  first: number;
  /** Emitted chunks: index - first. */
  rel: Uint32Array;
  /** Compressed length per emitted chunk; 0 = zero chunk (no data). */
  dataLen: Uint32Array;
  digests: ArrayBuffer;
  data: ArrayBuffer;
  chunksRead: number;
  chunksZero: number;
  chunksUnchanged: number;
  bytesRead: number;
}

export interface TaskFailure {
  seq: number;
  failure: { code: 'E_DEVICE' | 'E_INTERNAL'; message: string; errno?: string };
}

/** O_DIRECT alignment of buffer, offset and length (covers 512- and 4096-byte devices). */
export const DIRECT_ALIGN = 4096;

/**
 * Page-aligned memory for O_DIRECT reads: a WebAssembly.Memory is mapped
 * whole pages (Node Buffers carry no alignment guarantee), 64 KiB a page.
 */
function alignedBuffer(bytes: number): Buffer {
  const mem = new WebAssembly.Memory({ initial: Math.ceil(bytes / 65536) });
  return Buffer.from(mem.buffer, 0, bytes);
}

/** `select` value of a chunk that lies in a hole of the file: zero without reading. */
export const SELECT_HOLE = 2;

class ShortRead extends Error {}

/** A fresh, transferable ArrayBuffer of exactly `length` bytes of `src` (not zero-filled first). */
function exactCopy(src: Buffer, length: number): ArrayBuffer {
  const out = Buffer.allocUnsafeSlow(length);
  src.copy(out, 0, 0, length);
  return out.buffer as ArrayBuffer;
}

function run(cfg: WorkerConfig): void {
  const { fd, chunkSize, volumeSize, taskChunks } = cfg;
  const buf = cfg.direct ? alignedBuffer(taskChunks * chunkSize) : Buffer.allocUnsafeSlow(taskChunks * chunkSize);
  const zero = Buffer.alloc(chunkSize);
  const bound = binding.compressBound(chunkSize);
  const scratch = Buffer.allocUnsafeSlow(bound * taskChunks);
  const digestScratch = Buffer.allocUnsafeSlow(32 * taskChunks);
  const relScratch = new Uint32Array(taskChunks);
  const lenScratch = new Uint32Array(taskChunks);
  const cctx = new binding.CCtx();

  function readFully(length: number, position: number): void {
    let got = 0;
    // O_DIRECT wants aligned lengths: ask for whole blocks; only the volume's
    // short last block reads short (EOF), which ends the loop.
    const want = cfg.direct ? Math.min(buf.length, Math.ceil(length / DIRECT_ALIGN) * DIRECT_ALIGN) : length;
    while (got < length) {
      const n = readSync(fd, buf, got, want - got, position + got);
      if (n === 0) {
        throw new ShortRead(
          `${cfg.path}: data ends at byte ${position + got}, volume size is ${volumeSize}`,
        );
      }
      got += n;
    }
  }

  function processTask(t: ReadTask): TaskResult {
    let emitted = 0, outOff = 0, chunksRead = 0, chunksZero = 0, chunksUnchanged = 0, bytesRead = 0;
    let r = 0;
    /** The zero-chunk path, shared by chunks read as zero and chunks known to lie in holes. */
    function zeroChunk(k: number): void {
      chunksZero++;
      if (cfg.mode === 'full') return;
      const dOff = emitted * 32;
      digestScratch.fill(0, dOff, dOff + 32);
      if (t.basis && digestScratch.compare(t.basis, k * 32, k * 32 + 32, dOff, dOff + 32) === 0) {
        chunksUnchanged++;
        return;
      }
      relScratch[emitted] = k;
      lenScratch[emitted] = 0;
      emitted++;
    }
    while (r < t.count) {
      const sel = t.select ? t.select[r] : 1;
      if (sel === 0) { r++; continue; }
      if (sel === SELECT_HOLE) { zeroChunk(r); r++; continue; }
      let runEnd = r + 1;
      while (runEnd < t.count && (!t.select || t.select[runEnd] === 1)) runEnd++;
      const runStart = (t.first + r) * chunkSize;
      const runBytes = Math.min((t.first + runEnd) * chunkSize, volumeSize) - runStart;
      readFully(runBytes, runStart);
      bytesRead += runBytes;
      for (let k = r; k < runEnd; k++) {
        const off = (k - r) * chunkSize;
        const len = Math.min(chunkSize, runBytes - off);
        const view = buf.subarray(off, off + len);
        chunksRead++;
        if (zero.compare(view, 0, len, 0, len) === 0) {
          zeroChunk(k);
          continue;
        }
        const dOff = emitted * 32;
        createHash('sha256').update(view).digest().copy(digestScratch, dOff);
        if (t.basis && digestScratch.compare(t.basis, k * 32, k * 32 + 32, dOff, dOff + 32) === 0) {
          chunksUnchanged++;
          continue;
        }
        const clen = cctx.compress(scratch.subarray(outOff, outOff + bound), view, cfg.level);
        outOff += clen;
        relScratch[emitted] = k;
        lenScratch[emitted] = clen;
        emitted++;
      }
      r = runEnd;
    }
    return {
      seq: t.seq, first: t.first,
      rel: relScratch.slice(0, emitted), dataLen: lenScratch.slice(0, emitted),
      digests: exactCopy(digestScratch, emitted * 32), data: exactCopy(scratch, outOff),
      chunksRead, chunksZero, chunksUnchanged, bytesRead,
    };
  }

  const port = parentPort!;
  port.on('message', (t: ReadTask) => {
    let res: TaskResult;
    try {
      res = processTask(t);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      const io = e instanceof ShortRead || typeof err.code === 'string';
      const failure: TaskFailure = {
        seq: t.seq,
        failure: { code: io ? 'E_DEVICE' : 'E_INTERNAL', message: String(err.message), errno: err.code },
      };
      port.postMessage(failure);
      return;
    }
    port.postMessage(res, [res.rel.buffer as ArrayBuffer, res.dataLen.buffer as ArrayBuffer, res.digests, res.data]);
  });
}

if (parentPort && workerData) run(workerData as WorkerConfig);
