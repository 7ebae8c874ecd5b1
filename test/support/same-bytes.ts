import { open } from 'node:fs/promises';

/** What `cmp A B` says, without its cost. */
export interface FileComparison {
  identical: boolean;
  /** Where they first differ (size, or byte offset), else ''. */
  detail: string;
}

const WINDOW = 4 << 20;
const IN_FLIGHT = 4;

/**
 * Compares two files (or block devices) byte for byte, like `cmp A B`:
 * identical only with the same length and every byte equal. Holes are read
 * like any other byte (as zeros), nothing is skipped.
 *
 * Why not cmp: it reads both files alternately in small buffers, which on a
 * freshly made reflink snapshot in the lab's loop-backed pool ran at
 * ~100 MB/s (5.3 s for a 512 MiB image, page cache cold); four 4 MiB windows
 * in flight per file read the same in 0.5 s. The e2e files compare every
 * image they take with its snapshot, so this was most of their time.
 *
 * `bytes` limits the comparison to the first `bytes` of each (cmp -n N).
 */
export async function compareFiles(a: string, b: string, bytes?: number): Promise<FileComparison> {
  const fa = await open(a, 'r');
  try {
    const fb = await open(b, 'r');
    try {
      // A block device stats as size 0: its length is where a read returns 0 bytes (checked below).
      const [sa, sb] = [await fa.stat(), await fb.stat()];
      if (bytes === undefined && sa.isFile() && sb.isFile() && sa.size !== sb.size) {
        return { identical: false, detail: `sizes differ: ${a} ${sa.size} bytes, ${b} ${sb.size} bytes` };
      }
      let next = 0;
      let firstDiff: string | undefined;
      let firstDiffAt = Infinity;
      let ended = Infinity; // offset where both files ended together
      const worker = async () => {
        const ba = Buffer.alloc(WINDOW);
        const bb = Buffer.alloc(WINDOW);
        for (;;) {
          const pos = next;
          if (pos >= firstDiffAt || pos >= ended || (bytes !== undefined && pos >= bytes)) return;
          next += WINDOW;
          const want = bytes === undefined ? WINDOW : Math.min(WINDOW, bytes - pos);
          const [ra, rb] = await Promise.all([readFull(fa, ba, want, pos), readFull(fb, bb, want, pos)]);
          const n = Math.min(ra, rb);
          if (!ba.subarray(0, n).equals(bb.subarray(0, n))) {
            let i = 0;
            while (ba[i] === bb[i]) i++;
            if (pos + i < firstDiffAt) {
              firstDiffAt = pos + i;
              firstDiff = `differ: byte ${pos + i + 1} (cmp counts from 1)`;
            }
            return;
          }
          if (ra !== rb) {
            if (pos + n < firstDiffAt) {
              firstDiffAt = pos + n;
              firstDiff = `EOF on ${ra < rb ? a : b} after byte ${pos + n}`;
            }
            return;
          }
          if (ra < want) {
            ended = Math.min(ended, pos + ra);
            return;
          }
        }
      };
      await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
      return firstDiff === undefined ? { identical: true, detail: '' } : { identical: false, detail: `${a} ${b} ${firstDiff}` };
    } finally {
      await fb.close();
    }
  } finally {
    await fa.close();
  }
}

/** Reads up to `want` bytes at `pos` (fewer only at the end of the file). */
async function readFull(fh: Awaited<ReturnType<typeof open>>, buf: Buffer, want: number, pos: number): Promise<number> {
  let got = 0;
  while (got < want) {
    const { bytesRead } = await fh.read(buf, got, want - got, pos + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}
