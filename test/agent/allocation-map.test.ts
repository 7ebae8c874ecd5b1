import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, openSync, closeSync, writeSync, ftruncateSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { dataRanges, holeChunks, parseSeekOutput } from '../../agent/blockdev/allocation-map.js';
import { readChunks } from '../../agent/reader/chunk-reader.js';

const C = 65536;
const dir = mkdtempSync(join(tmpdir(), 'bsn-alloc-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A sparse file of `chunks` chunks with random data in the given chunks only. */
function sparse(name: string, chunks: number, dataAt: number[]): { path: string; content: Map<number, Buffer> } {
  const path = join(dir, name);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, chunks * C);
  const content = new Map<number, Buffer>();
  for (const i of dataAt) {
    const b = randomBytes(C);
    writeSync(fd, b, 0, C, i * C);
    content.set(i, b);
  }
  closeSync(fd);
  return { path, content };
}

describe('allocation map (SEEK_DATA/SEEK_HOLE)', () => {
  it('parses xfs_io seek output, including data up to the end of the file', () => {
    const out = 'Whence\tResult\nHOLE\t0\nDATA\t196608\nHOLE\t327680\nDATA\t6553600\n';
    expect(parseSeekOutput(out, 7_000_000)).toEqual([{ start: 196608, end: 327680 }, { start: 6553600, end: 7_000_000 }]);
    expect(parseSeekOutput('garbage', 10)).toBeNull();
  });

  it('finds the data of a real sparse file and marks exactly the other chunks as holes', async () => {
    const f = sparse('a.img', 64, [3, 4, 40, 63]);
    const ranges = await dataRanges(f.path);
    expect(ranges).not.toBeNull();
    const holes = holeChunks(ranges!, 64 * C, C);
    const holeSet = [...Array(64).keys()].filter((i) => (holes[i >>> 5]! >>> (i & 31)) & 1);
    // Filesystems may allocate in bigger units than a chunk, never smaller: data chunks are never holes.
    for (const i of [3, 4, 40, 63]) expect(holeSet).not.toContain(i);
    expect(holeSet.length).toBeGreaterThan(50);
  });

  it('lets the reader skip holes: a full reads only data chunks, an incremental emits a hole whose basis was data as zero', async () => {
    const f = sparse('b.img', 64, [3, 40]);
    const holes = holeChunks((await dataRanges(f.path))!, 64 * C, C);
    const full = readChunks({ path: f.path, volumeSize: 64 * C, chunkSize: C, startIndex: 0, mode: 'full', holes });
    const got = [];
    for await (const c of full) got.push(c.index);
    expect(got).toEqual([3, 40]);
    expect(full.stats().bytesRead).toBeLessThan(16 * C);
    // Basis: chunk 10 had data, now it is a hole: it must travel as zero.
    const basis = Buffer.alloc(64 * 32);
    createHash('sha256').update(f.content.get(3)!).digest().copy(basis, 3 * 32);
    randomBytes(32).copy(basis, 10 * 32);
    const inc = readChunks({ path: f.path, volumeSize: 64 * C, chunkSize: C, startIndex: 0, mode: 'incremental', basisDigests: basis, holes });
    const out = [];
    for await (const c of inc) out.push([c.index, c.zero]);
    expect(out).toEqual([[10, true], [40, false]]);
  });
});
