import type { BlocksnapError } from '../proto/errors.js';

/**
 * Bounds the batch bytes sent but not yet acknowledged (DESIGN.md §4.2).
 * `reserve` waits until the batch fits (a single batch larger than the
 * window is let through alone, so progress is always possible); `ack(seq)`
 * releases every batch up to seq — acks are cumulative.
 */
export class FlowWindow {
  private readonly inflight: { seq: number; bytes: number }[] = [];
  private used = 0;
  private waiter: { need: number; resolve: () => void; reject: (e: BlocksnapError) => void } | null = null;
  private failed: BlocksnapError | null = null;

  constructor(readonly capacity: number) {}

  get bytesInFlight(): number {
    return this.used;
  }

  async reserve(seq: number, bytes: number): Promise<void> {
    if (this.failed) throw this.failed;
    if (this.used > 0 && this.used + bytes > this.capacity) {
      await new Promise<void>((resolve, reject) => (this.waiter = { need: bytes, resolve, reject }));
    }
    this.inflight.push({ seq, bytes });
    this.used += bytes;
  }

  ack(seq: number): void {
    while (this.inflight.length > 0 && this.inflight[0]!.seq <= seq) this.used -= this.inflight.shift()!.bytes;
    const w = this.waiter;
    if (w && (this.used === 0 || this.used + w.need <= this.capacity)) {
      this.waiter = null;
      w.resolve();
    }
  }

  /** Wakes a waiting sender with `err`; later reserves fail until reset(). */
  fail(err: BlocksnapError): void {
    this.failed = err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
  }

  /** After a resume: nothing is in flight on the new connection. */
  reset(): void {
    this.inflight.length = 0;
    this.used = 0;
    this.failed = null;
  }
}
