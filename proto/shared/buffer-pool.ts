/**
 * Reused ArrayBuffers for the large frames of the hot paths: a restore's
 * ~2 MiB RestoreChunks (encoded on the appliance, received on the agent)
 * and a backup's chunk batches. Measured on the random-data restore, each
 * batch in a fresh 2 MiB buffer cost both processes the kernel's page
 * faults on new memory (≈ 0.3 s of CPU per GiB per allocation site) and
 * V8 a full mark-compact every ~25-50 MiB (the buffers' external memory),
 * most of the restore's CPU besides the copies and SHA-256.
 *
 * Ownership is handed over, never shared: `take` gives a buffer to exactly
 * one user, and only a user that owns it exclusively again (its send
 * completed, a worker transferred it back) may `give` it. A buffer that is
 * never given back is collected as any other; the pool then makes a new one.
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
 * The process's pool for large frames (one per thread: a worker that gets
 * a buffer transferred hands it back to the main thread, which gives it
 * here). A buffer holds any frame up to the default 8 MiB limit (pages a
 * frame never reaches stay untouched: a restore batch uses ≈ 2 MiB of it);
 * 24 free buffers cover a restore's 32 MiB window of ~2 MiB batches.
 */
export const largeFrames = new BufferPool((8 << 20) + (64 << 10), 512 << 10, 24);
