import { closeSync, openSync, writeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { BlocksnapError, toBlocksnapError } from '../../../proto/errors.js';

/**
 * Reads a tracing instance's `trace_pipe` without ever blocking the main
 * thread or process exit.
 *
 * A read of trace_pipe sleeps in the kernel until data arrives. Done on the
 * libuv thread pool (fs streams) it pins a pool thread and makes
 * process.exit() wait forever. So a worker thread does blocking readSync()
 * calls and posts each chunk (a copy of exactly the bytes read, transferred,
 * so one allocation per read, not per event) to the main thread, where the
 * parser runs; message order is read order.
 *
 * To stop, the main thread raises a flag in shared memory and writes to the
 * instance's `trace_marker`: that wakes the sleeping read, the worker sees
 * the flag and exits. The same wake-up runs from a process 'exit' handler so
 * a process that exits without stop() does not hang. The worker is unref'd
 * except while someone awaits data from it (`hold()`), so an idle tracker
 * never keeps the process alive.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');
const stop = new Int32Array(workerData.stop);
function run() {
  let fd;
  try { fd = fs.openSync(workerData.pipe, 'r'); }
  catch (e) { parentPort.postMessage({ type: 'error', message: String(e && e.message) }); return; }
  parentPort.postMessage({ type: 'open' });
  const buf = new Uint8Array(workerData.readSize);
  for (;;) {
    let n = 0;
    try { n = fs.readSync(fd, buf, 0, buf.length, null); }
    catch (e) {
      if (e && (e.code === 'EINTR' || e.code === 'EAGAIN')) continue;
      parentPort.postMessage({ type: 'error', message: String(e && e.message) });
      break;
    }
    if (n > 0) {
      const out = buf.slice(0, n);
      parentPort.postMessage({ type: 'data', bytes: out }, [out.buffer]);
    }
    if (Atomics.load(stop, 0) !== 0) break;
    if (n === 0) Atomics.wait(stop, 0, 0, 20);
  }
  fs.closeSync(fd);
}
run();
`;

type WorkerMessage = { type: 'open' } | { type: 'data'; bytes: Uint8Array } | { type: 'error'; message: string };

export interface TracePipeReaderEvents {
  data(bytes: Uint8Array): void;
  /** The reader stopped without being asked to (read error, worker crash). */
  failed(message: string): void;
}

export class TracePipeReader {
  private readonly worker: Worker;
  private readonly stopFlag = new Int32Array(new SharedArrayBuffer(4));
  private readonly markerFd: number;
  private readonly onExit = () => this.wake();
  private holds = 0;
  private stopping = false;
  private exited: Promise<void>;

  private constructor(instanceDir: string, events: TracePipeReaderEvents, opened: (err?: Error) => void) {
    this.markerFd = openSync(`${instanceDir}/trace_marker`, 'w');
    this.worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { pipe: `${instanceDir}/trace_pipe`, stop: this.stopFlag.buffer, readSize: 256 * 1024 },
    });
    this.worker.unref();
    this.exited = new Promise((resolve) => this.worker.once('exit', () => resolve()));
    this.worker.on('message', (m: WorkerMessage) => {
      if (m.type === 'data') events.data(m.bytes);
      else if (m.type === 'open') opened();
      else {
        opened(new Error(m.message));
        if (!this.stopping) events.failed(m.message);
      }
    });
    this.worker.on('error', (e) => {
      opened(e);
      if (!this.stopping) events.failed(e.message);
    });
    this.worker.on('exit', () => {
      if (!this.stopping) events.failed('trace_pipe reader exited');
    });
    process.on('exit', this.onExit);
  }

  /** Starts a reader; resolves once trace_pipe is open. */
  static async open(instanceDir: string, events: TracePipeReaderEvents): Promise<TracePipeReader> {
    let reader: TracePipeReader | undefined;
    await new Promise<void>((resolve, reject) => {
      let settled = false;
      reader = new TracePipeReader(instanceDir, events, (err) => {
        if (settled) return;
        settled = true;
        if (err) reject(new BlocksnapError('E_TRACKER', `cannot read ${instanceDir}/trace_pipe: ${err.message}`, { cause: err }));
        else resolve();
      });
      reader.hold();
    }).catch(async (e) => {
      await reader?.close();
      throw toBlocksnapError(e, 'E_TRACKER');
    });
    reader!.release();
    return reader!;
  }

  /** Writes a line into the instance's buffer (a barrier token). */
  mark(text: string): void {
    writeSync(this.markerFd, text);
  }

  /** Keeps the process alive while the caller waits for data. */
  hold(): void {
    if (this.holds++ === 0) this.worker.ref();
  }

  release(): void {
    if (--this.holds === 0) this.worker.unref();
  }

  /** Stops the worker and waits for it; idempotent. */
  async close(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      this.wake();
    }
    this.worker.ref();
    // A wake-up can race the worker entering read(): keep poking until it is gone.
    const poke = setInterval(() => this.wake(), 50);
    try {
      await this.exited;
    } finally {
      clearInterval(poke);
      process.off('exit', this.onExit);
      try {
        closeSync(this.markerFd);
      } catch {
        /* already closed */
      }
    }
  }

  private wake(): void {
    Atomics.store(this.stopFlag, 0, 1);
    try {
      writeSync(this.markerFd, 'blocksnap-reader-stop\n');
    } catch {
      /* marker fd closed: the worker is already gone */
    }
  }
}
