/**
 * Reorder buffer: results arrive in any order keyed by a sequence number and
 * are taken strictly in sequence. It holds only what the producer put, so its
 * memory is bounded by how many sequence numbers the caller has in flight.
 *
 * A per-item failure (`putError`) is delivered in order, after every item
 * before it; a global failure (`fail`) is delivered to the next `take` at once
 * and to every later one.
 */
export class OrderedOutput<T> {
  private readonly ready = new Map<number, { ok: true; value: T } | { ok: false; error: unknown }>();
  private waiter: { seq: number; resolve: (v: T) => void; reject: (e: unknown) => void } | undefined;
  private failure: { error: unknown } | undefined;

  put(seq: number, value: T): void {
    this.settle(seq, { ok: true, value });
  }

  putError(seq: number, error: unknown): void {
    this.settle(seq, { ok: false, error });
  }

  /** Fails the current and all future takes (crash, abort). First failure wins. */
  fail(error: unknown): void {
    if (this.failure) return;
    this.failure = { error };
    const w = this.waiter;
    this.waiter = undefined;
    this.ready.clear();
    w?.reject(error);
  }

  take(seq: number): Promise<T> {
    if (this.failure) return Promise.reject(this.failure.error);
    if (this.waiter) return Promise.reject(new Error('OrderedOutput: concurrent take'));
    const entry = this.ready.get(seq);
    if (entry) {
      this.ready.delete(seq);
      return entry.ok ? Promise.resolve(entry.value) : Promise.reject(entry.error);
    }
    return new Promise<T>((resolve, reject) => {
      this.waiter = { seq, resolve, reject };
    });
  }

  private settle(seq: number, entry: { ok: true; value: T } | { ok: false; error: unknown }): void {
    if (this.failure) return;
    const w = this.waiter;
    if (w && w.seq === seq) {
      this.waiter = undefined;
      if (entry.ok) w.resolve(entry.value);
      else w.reject(entry.error);
      return;
    }
    this.ready.set(seq, entry);
  }
}
