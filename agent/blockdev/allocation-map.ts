import { execa } from 'execa';
import { stat } from 'node:fs/promises';
import { BlocksnapError } from '../../proto/errors.js';
import { chunkCountOf } from '../../proto/shared/volume-geometry.js';

/**
 * Which byte ranges of a sparse file hold data (SEEK_DATA / SEEK_HOLE, read
 * through `xfs_io -r -c "seek -a -r 0"`, which works on ext4, XFS and btrfs).
 * A full backup of a 4 GiB volume image whose filesystem uses 1.5 GiB then
 * reads 1.5 GiB, not 4: the chunks entirely inside holes are zero by
 * definition and need no read.
 *
 * Returns null when the answer is unavailable (a block device, xfs_io
 * missing, a filesystem without SEEK_HOLE): the caller then reads everything,
 * which is always correct.
 */
export interface DataRange {
  start: number;
  end: number;
}

export async function dataRanges(path: string): Promise<DataRange[] | null> {
  const st = await stat(path).catch((e) => {
    throw new BlocksnapError('E_DEVICE', `cannot stat ${path}`, { cause: e });
  });
  if (!st.isFile()) return null;
  const r = await execa('xfs_io', ['-r', '-c', 'seek -a -r 0', path], { reject: false, stdin: 'ignore', timeout: 60_000 });
  if (r.exitCode !== 0) return null;
  return parseSeekOutput(String(r.stdout), st.size);
}

/** Parses `xfs_io seek -a -r` output ("Whence\tResult", then "DATA\t<off>" / "HOLE\t<off>" lines). */
export function parseSeekOutput(out: string, size: number): DataRange[] | null {
  const ranges: DataRange[] = [];
  let dataStart: number | null = null;
  let sawAny = false;
  for (const line of out.split('\n')) {
    const m = /^(DATA|HOLE)\s+(\d+)\s*$/.exec(line.trim());
    if (!m) continue;
    sawAny = true;
    const off = Number(m[2]);
    if (m[1] === 'DATA') {
      if (dataStart === null) dataStart = off;
    } else if (dataStart !== null) {
      ranges.push({ start: dataStart, end: off });
      dataStart = null;
    }
  }
  if (!sawAny) return size === 0 ? [] : null;
  if (dataStart !== null) ranges.push({ start: dataStart, end: size });
  return ranges;
}

/** Bit i set = chunk i overlaps no data range (it reads as zeros). Same bit layout as the reader's `select`. */
export function holeChunks(ranges: DataRange[], volumeSize: number, chunkSize: number): Uint32Array {
  const n = chunkCountOf(volumeSize, chunkSize);
  const words = new Uint32Array(Math.ceil(n / 32)).fill(0xffffffff);
  for (const { start, end } of ranges) {
    if (end <= start) continue;
    const first = Math.floor(start / chunkSize);
    const last = Math.min(n - 1, Math.floor((end - 1) / chunkSize));
    for (let i = first; i <= last; i++) words[i >>> 5]! &= ~(1 << (i & 31));
  }
  // Bits past the last chunk stay set; the reader never looks at them.
  return words;
}
