/**
 * The buffers of a vectored write from byte `skip` on: a short writev (the
 * kernel may write less than asked) continues where it stopped. Shared by the
 * restore writer on the main thread and the restore workers.
 */
export function sliceFrom(bufs: Buffer[], skip: number): Buffer[] {
  if (skip === 0) return bufs;
  const out: Buffer[] = [];
  for (const b of bufs) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}
