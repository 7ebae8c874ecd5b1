/**
 * The worker-slot base (proto/shared/worker-slots.ts) that the reader's pool,
 * the restore's workers and the store's blob read pool are built on: ref'ed
 * exactly while a task is outstanding, never unref'ed once close() began (the
 * exit-13 race), least-loaded choice, death reported and failing what the
 * worker had, close() settling after every thread exited. Fake workers for
 * the ref/unref sequence (a real Worker does not tell whether it is ref'ed),
 * one real thread for start, reply, failure and close.
 */
import { EventEmitter } from 'node:events';
import { describe, expect, it } from 'vitest';
import { BlocksnapError } from '../../proto/errors.js';
import { WorkerCalls, WorkerSlots, type SlotWorker, type WorkerSlot } from '../../proto/shared/worker-slots.js';

class FakeWorker extends EventEmitter {
  refd = true; // a new Worker is ref'ed
  posted: unknown[] = [];
  terminated = false;
  private exit?: () => void;
  ref(): void { this.refd = true; }
  unref(): void { this.refd = false; }
  postMessage(m: unknown): void { this.posted.push(m); }
  terminate(): Promise<number> {
    this.terminated = true;
    this.ref(); // Node 20's terminate() refs the worker too
    return new Promise((res) => { this.exit = () => { this.emit('exit', 1); res(1); }; });
  }
  /** The thread ends (after terminate()). */
  finish(): void { this.exit!(); }
}

function fakes(n: number): { workers: FakeWorker[]; spawn: () => SlotWorker } {
  const workers: FakeWorker[] = [];
  return { workers, spawn: () => { const w = new FakeWorker(); workers.push(w); return w as unknown as SlotWorker; } };
}

const entry = new URL('../support/echo-worker', import.meta.url);

describe('WorkerSlots (fake workers)', () => {
  it('an idle worker is unref\'ed; ref\'ed from the first task sent until the last is answered', () => {
    const f = fakes(1);
    const seen: unknown[] = [];
    const pool = new WorkerSlots<unknown>(1, { entry, name: 'w', spawn: f.spawn, message: (_s, m) => seen.push(m), death: () => {} });
    const w = f.workers[0]!;
    const slot = pool.slots[0]!;
    expect(w.refd).toBe(false);
    pool.send(slot, { a: 1 });
    pool.send(slot, { a: 2 });
    expect({ refd: w.refd, outstanding: slot.outstanding, posted: w.posted }).toEqual({ refd: true, outstanding: 2, posted: [{ a: 1 }, { a: 2 }] });
    w.emit('message', 'r1');
    pool.answered(slot);
    expect(w.refd).toBe(true);
    w.emit('message', 'r2');
    pool.answered(slot);
    expect({ refd: w.refd, outstanding: slot.outstanding, seen }).toEqual({ refd: false, outstanding: 0, seen: ['r1', 'r2'] });
  });

  it('answers that arrive after close() began do not unref the terminating worker, and close() waits for the exit', async () => {
    const f = fakes(1);
    const pool = new WorkerSlots<unknown>(1, { entry, name: 'w', spawn: f.spawn, message: (s) => pool.answered(s), death: () => {} });
    const w = f.workers[0]!;
    pool.send(pool.slots[0]!, 1);
    pool.send(pool.slots[0]!, 2);
    let closed = false;
    const closing = pool.close().then(() => { closed = true; });
    expect(pool.closing).toBe(true);
    w.emit('message', 'r1'); // queued before close() began
    w.emit('message', 'r2'); // the last answer: outside close() this would unref
    expect({ refd: w.refd, terminated: w.terminated }).toEqual({ refd: true, terminated: true });
    await new Promise((r) => setImmediate(r));
    expect(closed).toBe(false);
    w.finish();
    await closing;
    expect(w.refd).toBe(true);
  });

  it('least(): the live, usable slot with the fewest outstanding, the first on a tie', () => {
    const f = fakes(3);
    const pool = new WorkerSlots<unknown>(3, { entry, name: 'w', spawn: f.spawn, message: () => {}, death: () => {} });
    const [a, b, c] = pool.slots as [WorkerSlot, WorkerSlot, WorkerSlot];
    expect(pool.least()).toBe(a);
    pool.send(a, 0);
    expect(pool.least()).toBe(b);
    pool.send(b, 0);
    pool.send(c, 0);
    pool.send(c, 0);
    expect(pool.least()).toBe(a);
    expect(pool.least((s) => s !== a)).toBe(b);
    f.workers[0]!.emit('exit', 1);
    expect(pool.least()).toBe(b);
    expect(pool.least((s) => s === a)).toBeUndefined();
  });

  it('death: error then exit, each reported (E_INTERNAL, named); an exit while closing is E_CANCELLED', async () => {
    const f = fakes(2);
    const deaths: Array<[number, string, string]> = [];
    const pool = new WorkerSlots<unknown>(2, {
      entry, name: 'test worker', spawn: f.spawn, message: () => {},
      death: (s, e) => deaths.push([s.index, e.code, e.message]),
    });
    const cause = new Error('boom');
    f.workers[0]!.emit('error', cause);
    f.workers[0]!.emit('exit', 1);
    expect(pool.slots[0]!.dead).toMatchObject({ code: 'E_INTERNAL', message: 'test worker failed: boom', cause });
    const closing = pool.close();
    for (const w of f.workers) w.finish();
    await closing;
    expect(deaths).toEqual([
      [0, 'E_INTERNAL', 'test worker failed: boom'],
      [0, 'E_INTERNAL', 'test worker exited (code 1)'],
      [0, 'E_CANCELLED', 'test worker exited (code 1)'], // the fake emits exit again on terminate
      [1, 'E_CANCELLED', 'test worker exited (code 1)'],
    ]);
  });
});

describe('WorkerCalls (fake workers)', () => {
  it('a reply settles the call with its seq (in any order); messages without seq go to notice', async () => {
    const f = fakes(1);
    const notices: unknown[] = [];
    const calls = new WorkerCalls<{ seq: number; v: string }>(1, { entry, name: 'w', spawn: f.spawn, notice: (_s, m) => notices.push(m) });
    const w = f.workers[0]!;
    const slot = calls.slots[0]!;
    const p1 = calls.call(slot, { x: 1 });
    const p2 = calls.call(slot, { x: 2 });
    const [m1, m2] = w.posted as Array<{ seq: number; x: number }>;
    expect([m1!.x, m2!.x, m1!.seq !== m2!.seq]).toEqual([1, 2, true]);
    w.emit('message', { ready: true });
    w.emit('message', { seq: m2!.seq, v: 'two' });
    expect(w.refd).toBe(true);
    w.emit('message', { seq: m1!.seq, v: 'one' });
    expect(w.refd).toBe(false);
    expect(await Promise.all([p1, p2])).toEqual([{ seq: m1!.seq, v: 'one' }, { seq: m2!.seq, v: 'two' }]);
    expect(notices).toEqual([{ ready: true }]);
  });

  it('a worker that dies rejects what it had and every later call to it; the other slot still answers', async () => {
    const f = fakes(2);
    const calls = new WorkerCalls<{ seq: number }>(2, { entry, name: 'w', spawn: f.spawn });
    const [a, b] = calls.slots as [WorkerSlot, WorkerSlot];
    const had = calls.call(a, {});
    f.workers[0]!.emit('exit', 3);
    await expect(had).rejects.toMatchObject({ code: 'E_INTERNAL', message: 'w exited (code 3)' });
    await expect(calls.call(a, {})).rejects.toBeInstanceOf(BlocksnapError);
    expect(a.outstanding).toBe(0);
    expect(calls.least()).toBe(b);
    const ok = calls.call(b, {});
    f.workers[1]!.emit('message', { seq: (f.workers[1]!.posted[0] as { seq: number }).seq });
    await expect(ok).resolves.toBeDefined();
  });

  it('calls outstanding at close() are rejected E_CANCELLED when the thread exits', async () => {
    const f = fakes(1);
    const calls = new WorkerCalls<{ seq: number }>(1, { entry, name: 'w', spawn: f.spawn });
    const had = calls.call(calls.slots[0]!, {});
    const closing = calls.close();
    f.workers[0]!.finish();
    await closing;
    await expect(had).rejects.toMatchObject({ code: 'E_CANCELLED' });
  });
});

describe('WorkerCalls (a real thread: test/support/echo-worker.ts)', () => {
  it('starts with workerData, answers, fails named with the cause, and close() settles after the thread exited', async () => {
    const ready: unknown[] = [];
    const calls = new WorkerCalls<{ seq: number; value: number }>(1, { entry, workerData: { tag: 'x' }, name: 'echo worker', notice: (s, m) => ready.push([s.index, m]) });
    try {
      const a = calls.slots[0]!;
      expect((await calls.call(a, { op: 'double', value: 21 })).value).toBe(42);
      expect(ready).toEqual([[0, { ready: true, workerData: { tag: 'x' } }]]);
      await expect(calls.call(a, { op: 'throw', value: 0 })).rejects.toMatchObject({ code: 'E_INTERNAL', message: 'echo worker failed: boom' });
      await a.exited;
      expect(calls.least()).toBeUndefined();
    } finally {
      await calls.close();
    }
    await Promise.all(calls.slots.map((s) => s.exited));
  }, 60_000);
});
