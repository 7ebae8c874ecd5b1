/**
 * Worker threads that read, decompress and re-hash blobs for
 * `FsChunkStore.getMany` (blob-read-worker.ts): the NBD server's reads spent
 * most of the one JS thread in pread dispatch and SHA-256 (README
 * Benchmarks); here they run beside it. A task goes to the worker with the
 * fewest outstanding; an idle worker is unref'ed (a store nobody closes does
 * not hold the process); a worker that dies fails what it had.
 *
 * Worker file: `blob-read-worker.js` next to this module when compiled,
 * `.ts` from sources (vitest/tsx: started from a bootstrap that registers
 * tsx's ESM hooks in the thread first, as agent/reader/worker-pool.ts does).
 */
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { BlocksnapError } from '../../proto/errors.js';
import type { BlobReadReply, BlobReadTask } from './blob-read-worker.js';

function spawn(): Worker {
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const entry = new URL('./blob-read-worker' + ext, import.meta.url);
  if (ext === '.js') return new Worker(entry);
  const tsxApi = createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs');
  const boot =
    `import(${JSON.stringify(pathToFileURL(tsxApi).href)})` +
    `.then((api) => { api.register(); return import(${JSON.stringify(entry.href)}); });`;
  return new Worker(boot, { eval: true });
}

interface Pending {
  resolve(r: BlobReadReply): void;
  reject(e: BlocksnapError): void;
}

export class BlobReadPool {
  private readonly slots: { w: Worker; pending: Map<number, Pending>; exited: Promise<void>; ready: boolean }[] = [];
  private closing = false;
  private next = 0;

  constructor(size: number) {
    for (let i = 0; i < size; i++) {
      const w = spawn();
      const slot = { w, pending: new Map<number, Pending>(), exited: new Promise<void>((res) => w.once('exit', () => res())), ready: false };
      w.unref();
      const failAll = (e: BlocksnapError): void => {
        for (const p of slot.pending.values()) p.reject(e);
        slot.pending.clear();
      };
      w.on('message', (m: BlobReadReply | { ready: true }) => {
        if ('ready' in m) {
          slot.ready = true;
          return;
        }
        const p = slot.pending.get(m.seq);
        slot.pending.delete(m.seq);
        if (slot.pending.size === 0 && !this.closing) w.unref(); // not while closing: the reader pool's exit-13 race
        p?.resolve(m);
      });
      w.on('error', (e) => failAll(new BlocksnapError('E_INTERNAL', `blob read worker failed: ${e.message}`, { cause: e })));
      w.on('exit', (code) => failAll(new BlocksnapError(this.closing ? 'E_CANCELLED' : 'E_INTERNAL', `blob read worker exited (code ${code})`)));
      this.slots.push(slot);
    }
  }

  /**
   * Whether a worker has loaded. Until then a caller reads on its own thread:
   * a worker's start must not delay the first reads (a mount's are urgent).
   */
  get ready(): boolean {
    return !this.closing && this.slots.some((s) => s.ready);
  }

  /**
   * Every ready worker already has `depth` tasks waiting: a caller does
   * better reading on its own thread than queueing behind them (on a loaded
   * host the workers are the ones that do not get the CPU).
   */
  busy(depth = 2): boolean {
    return !this.slots.some((s) => s.ready && s.pending.size < depth);
  }

  /** Reads, decodes and checks the task's blobs in a ready worker (see `ready`); the task's arrays are transferred. */
  run(task: Omit<BlobReadTask, 'seq'>): Promise<BlobReadReply> {
    if (!this.ready) return Promise.reject(new BlocksnapError('E_CANCELLED', 'no blob read worker is ready'));
    let best: (typeof this.slots)[number] | undefined;
    for (const s of this.slots) if (s.ready && (!best || s.pending.size < best.pending.size)) best = s;
    const seq = ++this.next;
    const slot = best!;
    return new Promise<BlobReadReply>((resolve, reject) => {
      if (slot.pending.size === 0) slot.w.ref();
      slot.pending.set(seq, { resolve, reject });
      slot.w.postMessage({ ...task, seq }, [
        task.offset.buffer as ArrayBuffer, task.stored.buffer as ArrayBuffer, task.plain.buffer as ArrayBuffer,
        task.codec.buffer as ArrayBuffer, task.digests.buffer as ArrayBuffer,
      ]);
    });
  }

  /** Terminates every worker and resolves once all threads have exited. */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.slots.map(async (s) => {
      s.w.ref();
      await s.w.terminate();
      await s.exited;
    }));
  }
}
