/**
 * Worker threads held in slots: the part the reader's pool
 * (agent/reader/worker-pool.ts), the restore's workers
 * (agent/restore/restore-workers.ts) and the store's blob read pool
 * (appliance/store/blob-read-pool.ts) have in common, written once.
 *
 * - A worker with nothing outstanding is unref'ed, so a consumer that drops a
 *   pool without close() does not keep the process alive; sending it a task
 *   refs it again, so an awaited task always holds the event loop.
 * - No unref while closing: a reply already queued when close() began would
 *   unref the worker that close() refs to terminate it, and a process with
 *   nothing else alive would end with close() unsettled (Node exits 13;
 *   test/agent/worker-pool-close.test.ts shows the race).
 * - A worker that fails or exits is reported once per event (`death`) and is
 *   no longer picked for tasks.
 *
 * `WorkerCalls` adds request/reply on top: each task carries a `seq`, its
 * reply names it, a dying worker fails what it had.
 *
 * Worker file: `<entry>.js` when running compiled (dist/), `<entry>.ts` when
 * running from sources (vitest, tsx). Node 20 ignores `--import tsx` in a
 * Worker's execArgv for the entry module, so a .ts worker is started from a
 * tiny eval bootstrap that registers tsx's ESM hooks in the worker thread
 * first and then imports the worker file.
 */
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker, type TransferListItem } from 'node:worker_threads';
import { BlocksnapError } from '../errors.js';

/** What a slot needs of a worker thread (a test passes a fake). */
export type SlotWorker = Pick<Worker, 'ref' | 'unref' | 'postMessage' | 'terminate' | 'on' | 'once'>;

/** Starts a worker thread running `entry` (a module URL without extension; see the header for .ts/.js). */
export function spawnWorker(entry: URL, workerData?: unknown): Worker {
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const file = new URL(entry.href + ext);
  if (ext === '.js') return new Worker(file, { workerData });
  const tsxApi = createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs');
  const boot =
    `import(${JSON.stringify(pathToFileURL(tsxApi).href)})` +
    `.then((api) => { api.register(); return import(${JSON.stringify(file.href)}); });`;
  return new Worker(boot, { eval: true, workerData });
}

export interface WorkerSlot {
  readonly index: number;
  readonly worker: SlotWorker;
  /** Tasks sent and not yet answered; the worker is ref'ed while this is above 0. */
  readonly outstanding: number;
  /** Resolves when the thread has exited. */
  readonly exited: Promise<void>;
  /** Set by the first `error` or `exit`: the slot is not picked again. */
  readonly dead: BlocksnapError | undefined;
}

interface MutableSlot {
  index: number;
  worker: SlotWorker;
  outstanding: number;
  exited: Promise<void>;
  dead: BlocksnapError | undefined;
}

export interface WorkerSlotsSpec<M> {
  /** The worker module (URL without extension), started with `workerData`. */
  entry: URL;
  workerData?: unknown;
  /** Names the worker in errors: `<name> failed: …`, `<name> exited (code N)`. */
  name: string;
  /** A message from a slot's worker; call `answered(slot)` when it ends a task. */
  message(slot: WorkerSlot, m: M): void;
  /**
   * The worker failed (E_INTERNAL) or exited (E_INTERNAL; E_CANCELLED while
   * closing, where it is expected). Called for each event: `error` is followed by `exit`.
   */
  death(slot: WorkerSlot, err: BlocksnapError): void;
  /** Starts a worker; default `spawnWorker(entry, workerData)`. */
  spawn?(): SlotWorker;
}

export class WorkerSlots<M> {
  private readonly all: MutableSlot[] = [];
  private closingNow = false;

  constructor(size: number, spec: WorkerSlotsSpec<M>) {
    for (let i = 0; i < size; i++) {
      const w = spec.spawn ? spec.spawn() : spawnWorker(spec.entry, spec.workerData);
      const slot: MutableSlot = { index: i, worker: w, outstanding: 0, exited: new Promise<void>((res) => w.once('exit', () => res())), dead: undefined };
      w.unref();
      w.on('message', (m: M) => spec.message(slot, m));
      w.on('error', (e: Error) => {
        const err = new BlocksnapError('E_INTERNAL', `${spec.name} failed: ${e.message}`, { cause: e });
        slot.dead ??= err;
        spec.death(slot, err);
      });
      w.on('exit', (code: number) => {
        const err = new BlocksnapError(this.closingNow ? 'E_CANCELLED' : 'E_INTERNAL', `${spec.name} exited (code ${code})`);
        slot.dead ??= err;
        spec.death(slot, err);
      });
      this.all.push(slot);
    }
  }

  get slots(): readonly WorkerSlot[] {
    return this.all;
  }

  /** close() has begun. */
  get closing(): boolean {
    return this.closingNow;
  }

  /** The live slot with the fewest outstanding tasks among those `usable` accepts (the first on a tie). */
  least(usable?: (s: WorkerSlot) => boolean): WorkerSlot | undefined {
    let best: MutableSlot | undefined;
    for (const s of this.all) {
      if (s.dead || (usable && !usable(s))) continue;
      if (!best || s.outstanding < best.outstanding) best = s;
    }
    return best;
  }

  /** Sends a task to the slot's worker: counted as outstanding, an idle worker ref'ed. */
  send(slot: WorkerSlot, msg: unknown, transfer?: readonly TransferListItem[]): void {
    const s = this.all[slot.index]!;
    if (s.outstanding++ === 0) s.worker.ref();
    s.worker.postMessage(msg, transfer);
  }

  /** A task of the slot ended (its reply came): an idle worker is unref'ed, but not while closing (see the header). */
  answered(slot: WorkerSlot): void {
    const s = this.all[slot.index]!;
    if (s.outstanding > 0 && --s.outstanding === 0 && !this.closingNow) s.worker.unref();
  }

  /** A slot whose worker died: nothing of it is outstanding any more. */
  forget(slot: WorkerSlot): void {
    this.all[slot.index]!.outstanding = 0;
  }

  /** Terminates every worker and resolves once all threads have exited. */
  async close(): Promise<void> {
    this.closingNow = true;
    await Promise.all(this.all.map(async (s) => {
      // An idle worker is unref'ed: ref it while it terminates (Node 20's
      // terminate() refs it too), or a process with nothing else alive can end
      // with this await unsettled — Node exits 13.
      s.worker.ref();
      await s.worker.terminate();
      await s.exited;
    }));
  }
}

interface Pending<R> {
  resolve(r: R): void;
  reject(e: BlocksnapError): void;
}

export interface WorkerCallsSpec {
  entry: URL;
  workerData?: unknown;
  name: string;
  /** A message without a numeric `seq` (e.g. a worker's "ready"). */
  notice?(slot: WorkerSlot, m: unknown): void;
  spawn?(): SlotWorker;
}

/**
 * Request/reply over worker slots: `call` gives the task a `seq`, the reply
 * with that `seq` settles it; a worker that dies rejects what it had
 * (E_CANCELLED when it was closed, E_INTERNAL otherwise).
 */
export class WorkerCalls<R extends { seq: number }> {
  private readonly pool: WorkerSlots<R | { seq?: undefined }>;
  private readonly pending: Map<number, Pending<R>>[] = [];
  private next = 0;

  constructor(size: number, spec: WorkerCallsSpec) {
    for (let i = 0; i < size; i++) this.pending.push(new Map());
    this.pool = new WorkerSlots<R | { seq?: undefined }>(size, {
      entry: spec.entry,
      workerData: spec.workerData,
      name: spec.name,
      spawn: spec.spawn,
      message: (slot, m) => {
        if (typeof m.seq !== 'number') {
          spec.notice?.(slot, m);
          return;
        }
        const mine = this.pending[slot.index]!;
        const p = mine.get(m.seq);
        if (!p) return;
        mine.delete(m.seq);
        this.pool.answered(slot);
        p.resolve(m as R);
      },
      death: (slot, err) => {
        const mine = this.pending[slot.index]!;
        for (const p of mine.values()) p.reject(err);
        mine.clear();
        this.pool.forget(slot);
      },
    });
  }

  get slots(): readonly WorkerSlot[] {
    return this.pool.slots;
  }

  get closing(): boolean {
    return this.pool.closing;
  }

  least(usable?: (s: WorkerSlot) => boolean): WorkerSlot | undefined {
    return this.pool.least(usable);
  }

  /** Sends `task` (with a fresh `seq`) to the slot's worker, transferring `transfer`; resolves with its reply. */
  call(slot: WorkerSlot, task: object, transfer?: readonly TransferListItem[]): Promise<R> {
    if (slot.dead) return Promise.reject(slot.dead);
    const seq = ++this.next;
    return new Promise<R>((resolve, reject) => {
      this.pending[slot.index]!.set(seq, { resolve, reject });
      this.pool.send(slot, { ...task, seq }, transfer);
    });
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}
