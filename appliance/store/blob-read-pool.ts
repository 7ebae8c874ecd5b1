/**
 * Worker threads that read, decompress and re-hash blobs for
 * `FsChunkStore.getMany` (blob-read-worker.ts): the NBD server's reads spent
 * most of the one JS thread in pread dispatch and SHA-256 (README
 * Benchmarks); here they run beside it. A task goes to the worker with the
 * fewest outstanding; an idle worker is unref'ed (a store nobody closes does
 * not hold the process); a worker that dies fails what it had.
 *
 * Starting, ref/unref and closing are proto/shared/worker-slots.ts's.
 */
import { BlocksnapError } from '../../proto/errors.js';
import { WorkerCalls, type WorkerSlot } from '../../proto/shared/worker-slots.js';
import type { BlobReadReply, BlobReadTask } from './blob-read-worker.js';

export class BlobReadPool {
  private readonly calls: WorkerCalls<BlobReadReply>;
  /** Slots whose worker has loaded (it posts `{ ready: true }`). */
  private readonly loaded = new Set<number>();

  constructor(size: number) {
    this.calls = new WorkerCalls<BlobReadReply>(size, {
      entry: new URL('./blob-read-worker', import.meta.url),
      name: 'blob read worker',
      notice: (slot, m) => {
        if ((m as { ready?: boolean }).ready) this.loaded.add(slot.index);
      },
    });
  }

  /**
   * Whether a worker has loaded. Until then a caller reads on its own thread:
   * a worker's start must not delay the first reads (a mount's are urgent).
   */
  get ready(): boolean {
    return !this.calls.closing && this.calls.slots.some((s) => this.usable(s));
  }

  /**
   * Every ready worker already has `depth` tasks waiting: a caller does
   * better reading on its own thread than queueing behind them (on a loaded
   * host the workers are the ones that do not get the CPU).
   */
  busy(depth = 2): boolean {
    return !this.calls.slots.some((s) => this.usable(s) && s.outstanding < depth);
  }

  private usable(s: WorkerSlot): boolean {
    return this.loaded.has(s.index) && !s.dead;
  }

  /** Reads, decodes and checks the task's blobs in a ready worker (see `ready`); the task's arrays are transferred. */
  run(task: Omit<BlobReadTask, 'seq'>): Promise<BlobReadReply> {
    if (!this.ready) return Promise.reject(new BlocksnapError('E_CANCELLED', 'no blob read worker is ready'));
    const slot = this.calls.least((s) => this.usable(s))!;
    return this.calls.call(slot, task, [
      task.offset.buffer as ArrayBuffer, task.stored.buffer as ArrayBuffer, task.plain.buffer as ArrayBuffer,
      task.codec.buffer as ArrayBuffer, task.digests.buffer as ArrayBuffer,
    ]);
  }

  /** Terminates every worker and resolves once all threads have exited. */
  close(): Promise<void> {
    return this.calls.close();
  }
}
