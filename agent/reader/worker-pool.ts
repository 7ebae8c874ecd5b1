/**
 * The reader's worker threads (chunk-worker.ts): dispatch to the least-loaded
 * worker, results and failures as events, a worker that dies is fatal for the
 * read. Starting, ref/unref and closing are proto/shared/worker-slots.ts's
 * (an idle worker is unref'ed so an abandoned iterator does not keep the
 * process alive; no unref while closing: test/agent/worker-pool-close.test.ts).
 */
import { BlocksnapError } from '../../proto/errors.js';
import { WorkerSlots } from '../../proto/shared/worker-slots.js';
import type { ReadTask, TaskFailure, TaskResult, WorkerConfig } from './chunk-worker.js';

let live = 0;

/** Reader worker threads started and not yet exited, process-wide. */
export function liveReaderWorkers(): number {
  return live;
}

export interface PoolEvents {
  result(r: TaskResult): void;
  failure(f: TaskFailure): void;
  /** A worker died on its own (uncaught error, OOM, exit): fatal for the read. */
  crash(err: BlocksnapError): void;
}

export class WorkerPool {
  private readonly slots: WorkerSlots<TaskResult | TaskFailure>;

  constructor(size: number, config: WorkerConfig, events: PoolEvents) {
    this.slots = new WorkerSlots<TaskResult | TaskFailure>(size, {
      entry: new URL('./chunk-worker', import.meta.url),
      workerData: config,
      name: 'reader worker',
      message: (slot, m) => {
        this.slots.answered(slot);
        if ('failure' in m) events.failure(m);
        else events.result(m);
      },
      death: (_slot, err) => {
        if (!this.slots.closing) events.crash(err);
      },
    });
    live += size;
    for (const s of this.slots.slots) void s.exited.then(() => { live--; });
  }

  dispatch(task: ReadTask): void {
    // A dead worker has already failed the read (crash); the first slot takes what still comes.
    const slot = this.slots.least() ?? this.slots.slots[0]!;
    // Transfer the per-task slices: they were copied for this task only.
    const transfer: ArrayBuffer[] = [];
    if (task.select) transfer.push(task.select.buffer as ArrayBuffer);
    if (task.basis) transfer.push(task.basis.buffer as ArrayBuffer);
    this.slots.send(slot, task, transfer);
  }

  /** Terminates every worker and resolves once all threads have exited. */
  close(): Promise<void> {
    return this.slots.close();
  }
}
