import { BlocksnapError } from '../../proto/errors.js';
import { WorkerCalls } from '../../proto/shared/worker-slots.js';
import type { RestoreTask, RestoreTaskReply, RestoreWorkerConfig } from './restore-worker.js';

/**
 * The restore's worker threads (restore-worker.ts): a batch goes to the
 * worker with the fewest outstanding; a worker that dies fails what it had.
 * Starting, ref/unref (an idle worker does not hold the process) and closing
 * are proto/shared/worker-slots.ts's.
 */
export class RestoreWorkers {
  private readonly calls: WorkerCalls<RestoreTaskReply>;

  constructor(size: number, config: RestoreWorkerConfig) {
    this.calls = new WorkerCalls<RestoreTaskReply>(size, {
      entry: new URL('./restore-worker', import.meta.url),
      workerData: config,
      name: 'restore worker',
    });
  }

  /** Checks and writes one batch in a worker; its buffers are transferred. */
  run(task: RestoreTask): Promise<RestoreTaskReply> {
    if (this.calls.closing) return Promise.reject(new BlocksnapError('E_CANCELLED', 'the restore workers are closed'));
    const slot = this.calls.least() ?? this.calls.slots[0]!;
    // The reply names the call's own seq; the caller's seq is put back (two tasks may share one).
    return this.calls.call(slot, task, [task.data, task.digests, task.index.buffer as ArrayBuffer, task.frameLen.buffer as ArrayBuffer, task.plainLen.buffer as ArrayBuffer])
      .then((r) => ({ ...r, seq: task.seq }));
  }

  /** Terminates every worker and resolves once all threads have exited. */
  close(): Promise<void> {
    return this.calls.close();
  }
}
