/**
 * The reader's worker threads: start, dispatch to the least-loaded worker,
 * terminate. A worker with no task outstanding is unref'ed, so a consumer that
 * abandons an iterator without return() does not keep the process alive;
 * dispatching refs it again, so an awaited task always holds the event loop.
 *
 * Worker file: `chunk-worker.js` next to this module when running compiled
 * (dist/), `chunk-worker.ts` when running from sources (vitest, tsx). Node 20
 * ignores `--import tsx` in a Worker's execArgv for the entry module, so a .ts
 * worker is started from a tiny eval bootstrap that registers tsx's ESM hooks
 * in the worker thread first and then imports the worker file.
 */
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { BlocksnapError } from '../../proto/errors.js';
import type { ReadTask, TaskFailure, TaskResult, WorkerConfig } from './chunk-worker.js';

let live = 0;

/** Reader worker threads started and not yet exited, process-wide. */
export function liveReaderWorkers(): number {
  return live;
}

/** Starts a worker thread running `file` (relative to this module, without extension; the restore's worker shares this). */
export function spawnWorker(config: unknown, file = './chunk-worker'): Worker {
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const entry = new URL(file + ext, import.meta.url);
  if (ext === '.js') return new Worker(entry, { workerData: config });
  const tsxApi = createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs');
  const boot =
    `import(${JSON.stringify(pathToFileURL(tsxApi).href)})` +
    `.then((api) => { api.register(); return import(${JSON.stringify(entry.href)}); });`;
  return new Worker(boot, { eval: true, workerData: config });
}

export interface PoolEvents {
  result(r: TaskResult): void;
  failure(f: TaskFailure): void;
  /** A worker died on its own (uncaught error, OOM, exit): fatal for the read. */
  crash(err: BlocksnapError): void;
}

export class WorkerPool {
  private readonly workers: { w: Worker; outstanding: number; exited: Promise<void> }[] = [];
  private closing = false;

  constructor(size: number, config: WorkerConfig, events: PoolEvents) {
    for (let i = 0; i < size; i++) {
      const w = spawnWorker(config);
      live++;
      const slot = { w, outstanding: 0, exited: new Promise<void>((res) => w.once('exit', () => { live--; res(); })) };
      w.unref();
      w.on('message', (m: TaskResult | TaskFailure) => {
        // Not while closing: a result already queued when close() began would
        // unref the worker terminate() just ref'ed, and a process with nothing
        // else alive would end with close() unsettled (exit 13; test/agent/worker-pool-close.test.ts).
        if (--slot.outstanding === 0 && !this.closing) w.unref();
        if ('failure' in m) events.failure(m);
        else events.result(m);
      });
      w.on('error', (e) => {
        if (!this.closing) events.crash(new BlocksnapError('E_INTERNAL', `reader worker failed: ${e.message}`, { cause: e }));
      });
      w.on('exit', (code) => {
        if (!this.closing) events.crash(new BlocksnapError('E_INTERNAL', `reader worker exited (code ${code})`));
      });
      this.workers.push(slot);
    }
  }

  dispatch(task: ReadTask): void {
    let best = this.workers[0]!;
    for (const s of this.workers) if (s.outstanding < best.outstanding) best = s;
    if (best.outstanding++ === 0) best.w.ref();
    // Transfer the per-task slices: they were copied for this task only.
    const transfer: ArrayBuffer[] = [];
    if (task.select) transfer.push(task.select.buffer as ArrayBuffer);
    if (task.basis) transfer.push(task.basis.buffer as ArrayBuffer);
    best.w.postMessage(task, transfer);
  }

  /** Terminates every worker and resolves once all threads have exited. */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.workers.map(async (s) => {
      // An idle worker is unref'ed: ref it while it terminates (Node 20's
      // terminate() refs it too), or a process with nothing else alive can end
      // with this await (and the consumer's abort) unsettled — Node exits 13.
      s.w.ref();
      await s.w.terminate();
      await s.exited;
    }));
  }
}
