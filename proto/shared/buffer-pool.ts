/**
 * Reused ArrayBuffers for the large frames a transport encodes: a restore's
 * ~2 MiB RestoreChunks on the appliance, a backup's chunk batches on the
 * agent (proto/ws-transport.ts takes one per frame and gives it back once
 * the socket wrote it). Measured on the random-data restore, a fresh ~2 MiB
 * buffer per batch made the appliance's V8 run a full mark-compact every
 * ~18 MiB sent (43 in 769 MiB) plus the page faults of new memory; with
 * the pool, one.
 *
 * Ownership is handed over, never shared: `take` gives a buffer to exactly
 * one user, and only a user that owns it exclusively again (its send
 * completed) may `give` it. A buffer that is never given back is collected
 * as any other; the pool then makes a new one. Not for buffers transferred
 * to another thread: a transferred-back ArrayBuffer is a new object (the
 * pool does not know it), and every transfer makes V8 count its bytes as new
 * external memory again.
 */
export class BufferPool {
  private readonly free: ArrayBuffer[] = [];
  private readonly ours = new WeakSet<ArrayBuffer>();
  /** Buffers made (not reused) so far: tests and the bench read it. */
  made = 0;
  /** Buffers reused so far. */
  reused = 0;

  constructor(
    /** Bytes of every pooled ArrayBuffer; larger requests are not pooled. */
    readonly capacity: number,
    /** Requests below this are not pooled (a small Buffer is cheap). */
    readonly minBytes: number,
    /** Free buffers kept at most (the rest are left to the GC). */
    readonly maxFree: number,
  ) {}

  /** Whether a request of `n` bytes is served from the pool. */
  fits(n: number): boolean {
    return n >= this.minBytes && n <= this.capacity;
  }

  /** `n` uninitialised bytes: a view of a pooled ArrayBuffer when `fits(n)`, else a new Buffer. */
  take(n: number): Buffer {
    if (!this.fits(n)) return Buffer.allocUnsafe(n);
    let ab = this.free.pop();
    if (ab) this.reused++;
    else {
      // Uninitialised: pages the frames never reach are never touched.
      ab = Buffer.allocUnsafeSlow(this.capacity).buffer as ArrayBuffer;
      this.ours.add(ab);
      this.made++;
    }
    return Buffer.from(ab, 0, n);
  }

  /** Whether `ab` was made by this pool (so a view of it from `take` is its taker's alone). */
  owns(ab: ArrayBufferLike): boolean {
    return ab instanceof ArrayBuffer && this.ours.has(ab);
  }

  /** Gives a buffer back. The caller must own it exclusively: nothing reads or writes it after this. */
  give(ab: ArrayBufferLike | undefined): void {
    if (!ab || !this.owns(ab) || ab.byteLength !== this.capacity) return; // detached (transferred away) or foreign
    if (this.free.length < this.maxFree && !this.free.includes(ab as ArrayBuffer)) this.free.push(ab as ArrayBuffer);
  }
}

/**
 * The process's pool for large frames. A buffer holds any frame up to the
 * default 8 MiB limit (pages a frame never reaches stay untouched: a restore
 * batch uses ≈ 2 MiB of it); sends are awaited one at a time on the hot
 * paths, so one or two buffers are in use.
 */
export const largeFrames = new BufferPool((8 << 20) + (64 << 10), 512 << 10, 8);
