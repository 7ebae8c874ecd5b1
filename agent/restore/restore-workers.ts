import type { Worker } from 'node:worker_threads';
import { BlocksnapError } from '../../proto/errors.js';
import { spawnWorker } from '../reader/worker-pool.js';
import type { RestoreTask, RestoreTaskReply, RestoreWorkerConfig } from './restore-worker.js';

/**
 * The restore's worker threads (restore-worker.ts), started the way the
 * reader's are (reader/worker-pool.ts): a batch goes to the worker with the
 * fewest outstanding; an idle worker is unref'ed so a writer nobody closes
 * does not hold the process; a worker that dies fails what it had.
 */
export class RestoreWorkers {
  private readonly slots: { w: Worker; pending: Map<number, Pending>; exited: Promise<void> }[] = [];
  private closing = false;
  private next = 0;

  constructor(size: number, config: RestoreWorkerConfig) {
    for (let i = 0; i < size; i++) {
      const w = spawnWorker(config, '../restore/restore-worker');
      const slot = { w, pending: new Map<number, Pending>(), exited: new Promise<void>((res) => w.once('exit', () => res())) };
      w.unref();
      const failAll = (e: BlocksnapError) => {
        for (const p of slot.pending.values()) p.reject(e);
        slot.pending.clear();
      };
      w.on('message', (m: RestoreTaskReply) => {
        const p = slot.pending.get(m.seq);
        slot.pending.delete(m.seq);
        // Not while closing: a reply already queued when close() began would
        // unref the worker terminate() refs, and a process with nothing else
        // alive could end with close() unsettled (exit 13) — the race the
        // reader's pool had (test/agent/worker-pool-close.test.ts).
        if (slot.pending.size === 0 && !this.closing) w.unref();
        p?.resolve(m);
      });
      w.on('error', (e) => failAll(new BlocksnapError('E_INTERNAL', `restore worker failed: ${e.message}`, { cause: e })));
      w.on('exit', (code) => failAll(new BlocksnapError(this.closing ? 'E_CANCELLED' : 'E_INTERNAL', `restore worker exited (code ${code})`)));
      this.slots.push(slot);
    }
  }

  /** Checks and writes one batch in a worker; its buffers are transferred. */
  run(task: RestoreTask): Promise<RestoreTaskReply> {
    if (this.closing) return Promise.reject(new BlocksnapError('E_CANCELLED', 'the restore workers are closed'));
    let best = this.slots[0]!;
    for (const s of this.slots) if (s.pending.size < best.pending.size) best = s;
    const id = ++this.next;
    return new Promise<RestoreTaskReply>((resolve, reject) => {
      if (best.pending.size === 0) best.w.ref();
      best.pending.set(id, { resolve, reject });
      // The reply names the task by `seq`; ids keep two tasks of one seq apart.
      best.w.postMessage({ ...task, seq: id }, [task.data, task.digests, task.index.buffer as ArrayBuffer, task.frameLen.buffer as ArrayBuffer, task.plainLen.buffer as ArrayBuffer]);
    }).then((r) => ({ ...r, seq: task.seq }));
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

interface Pending {
  resolve(r: RestoreTaskReply): void;
  reject(e: BlocksnapError): void;
}
