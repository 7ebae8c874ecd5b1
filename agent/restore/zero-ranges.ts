import type { FileHandle } from 'node:fs/promises';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

/**
 * Makes chunk ranges read as zero (DESIGN.md §4.6: zero chunks are holes).
 * - A file that starts empty (new, or replaced) needs nothing: unwritten
 *   ranges are holes.
 * - A file changed in place: ranges of at least PUNCH_MIN bytes are punched
 *   (`fallocate --punch-hole`, util-linux: Node has no fallocate), shorter
 *   ones written as zeros (a spawn costs more than writing them).
 * - A device: explicit zeros through the restore's own handle. The device is
 *   held O_EXCL for the whole restore, so `blkdiscard -z` (which opens it
 *   O_EXCL too) cannot run meanwhile; measured numbers in README Benchmarks.
 */
export interface ZeroTarget {
  kind: 'device' | 'file';
  path: string;
  handle: FileHandle;
  startsEmpty: boolean;
}

const ZEROS = Buffer.alloc(1 << 20);
const PUNCH_MIN = 1 << 20;

/** Zeroes each [offset, offset + length); returns the bytes made zero. */
export async function zeroRanges(t: ZeroTarget, ranges: Iterable<{ offset: number; length: number }>): Promise<number> {
  if (t.startsEmpty) {
    let n = 0;
    for (const r of ranges) n += r.length;
    return n;
  }
  let total = 0;
  for (const r of ranges) {
    if (t.kind === 'file' && r.length >= PUNCH_MIN) {
      await execa('fallocate', ['--punch-hole', '--keep-size', '--offset', String(r.offset), '--length', String(r.length), t.path]).catch((e) => {
        throw new BlocksnapError('E_DEVICE', `fallocate --punch-hole on ${t.path} at ${r.offset}: ${(e as Error).message}`, { cause: e });
      });
    } else {
      await writeZeros(t.handle, r.offset, r.length);
    }
    total += r.length;
  }
  return total;
}

async function writeZeros(h: FileHandle, offset: number, length: number): Promise<void> {
  let done = 0;
  while (done < length) {
    const parts: Buffer[] = [];
    let n = 0;
    // Up to 16 MiB per call, the same zero buffer repeated.
    while (n < length - done && parts.length < 16) {
      const len = Math.min(ZEROS.length, length - done - n);
      parts.push(ZEROS.subarray(0, len));
      n += len;
    }
    const { bytesWritten } = await h.writev(parts, offset + done);
    if (bytesWritten <= 0) throw new BlocksnapError('E_DEVICE', `zero write at ${offset + done} wrote nothing`);
    done += bytesWritten;
  }
}
