import { describe, expect, it } from 'vitest';
import { ChangeBitmap } from '../../agent/cbt/change-bitmap.js';
import { isBlocksnapError } from '../../proto/errors.js';

/** Reference model: one boolean per chunk, computed the slow obvious way. */
function reference(deviceSize: number, chunkSize: number, ranges: Array<[number, number]>): boolean[] {
  const n = Math.ceil(deviceSize / chunkSize);
  const out = new Array<boolean>(n).fill(false);
  for (const [sector, count] of ranges) {
    for (let s = sector; s < sector + count; s++) {
      const c = Math.floor((s * 512) / chunkSize);
      if (c < n) out[c] = true;
    }
  }
  return out;
}

function indexesOf(bools: boolean[]): number[] {
  return bools.flatMap((b, i) => (b ? [i] : []));
}

describe('ChangeBitmap', () => {
  it('maps sector ranges to exactly the chunks they touch', () => {
    const bm = new ChangeBitmap(1 << 20, 4096); // 256 chunks, 8 sectors each
    bm.setSectors(8, 8); // exactly chunk 1
    bm.setSectors(23, 2); // last sector of chunk 2 + first of chunk 3
    bm.setSectors(40, 1); // one sector in chunk 5
    bm.setSectors(100, 0); // a flush: nothing
    expect([...bm.indexes()]).toEqual([1, 2, 3, 5]);
    expect(bm.count()).toBe(4);
  });

  it('agrees with a reference model on random ranges, across word boundaries', () => {
    let seed = 12345;
    const rnd = (n: number) => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    for (const chunkSize of [512, 4096, 65536]) {
      const deviceSize = 3 * 1024 * 1024 + 1536; // not a multiple of the chunk size
      const sectors = deviceSize / 512;
      for (let round = 0; round < 20; round++) {
        const bm = new ChangeBitmap(deviceSize, chunkSize);
        const ranges: Array<[number, number]> = [];
        for (let i = 0; i < 1 + rnd(12); i++) {
          const sector = rnd(sectors);
          const count = 1 + rnd(Math.min(sectors - sector, 2048));
          ranges.push([sector, count]);
          expect(bm.setSectors(sector, count)).toBe(true);
        }
        const want = indexesOf(reference(deviceSize, chunkSize, ranges));
        expect([...bm.indexes()]).toEqual(want);
        expect(bm.count()).toBe(want.length);
      }
    }
  });

  it('fills whole words in the middle of a long range and keeps the tail clean', () => {
    const bm = new ChangeBitmap(100 * 4096, 4096); // 100 chunks → 4 words, 4 bits used in the last
    bm.setChunks(5, 99);
    expect(bm.count()).toBe(95);
    expect(bm.words[1]).toBe(0xffffffff);
    expect(bm.words[3]).toBe(0xf);
    bm.fill();
    expect(bm.count()).toBe(100);
    expect(bm.words[3]).toBe(0xf);
  });

  it('reports a range past the end without setting bits beyond the last chunk', () => {
    const bm = new ChangeBitmap(10 * 4096, 4096);
    expect(bm.setSectors(9 * 8, 16)).toBe(false); // chunk 9 and a non-existent chunk 10
    expect([...bm.indexes()]).toEqual([9]);
    expect(bm.setSectors(200, 8)).toBe(false);
    expect(bm.count()).toBe(1);
    expect(bm.setBytes(0, 4096)).toBe(true);
    expect(bm.setBytes(40960, 1)).toBe(false);
  });

  it('handles sector numbers beyond 2^32 (multi-TiB devices) exactly', () => {
    const size = 2 ** 44; // 16 TiB
    const bm = new ChangeBitmap(size, 65536);
    const sector = 2 ** 33 + 129; // byte offset 4 TiB + 66048 → chunk 2^26 + 1
    bm.setSectors(sector, 1);
    expect([...bm.indexes()]).toEqual([2 ** 26 + 1]);
  });

  it('unions, clones, compares, and refuses different shapes', () => {
    const a = new ChangeBitmap(1 << 20, 4096);
    const b = new ChangeBitmap(1 << 20, 4096);
    a.setChunk(3);
    b.setChunk(200);
    const c = a.clone();
    a.unionWith(b);
    expect([...a.indexes()]).toEqual([3, 200]);
    expect([...c.indexes()]).toEqual([3]);
    expect(a.equals(c)).toBe(false);
    c.setChunk(200);
    expect(a.equals(c)).toBe(true);
    let err: unknown;
    try {
      a.unionWith(new ChangeBitmap(1 << 20, 8192));
    } catch (e) {
      err = e;
    }
    expect(isBlocksnapError(err, 'E_TRACKER')).toBe(true);
  });

  it('nextSet walks set bits in order across words', () => {
    const bm = new ChangeBitmap(1000 * 512, 512);
    for (const i of [0, 31, 32, 63, 64, 500, 999]) bm.setChunk(i);
    expect([...bm.indexes()]).toEqual([0, 31, 32, 63, 64, 500, 999]);
    expect(bm.nextSet(65)).toBe(500);
    expect(bm.nextSet(1000)).toBe(-1);
    expect(bm.has(31)).toBe(true);
    expect(bm.has(30)).toBe(false);
  });

  it('serializes to little-endian words and back', () => {
    const bm = new ChangeBitmap(40 * 4096, 4096); // 40 chunks → 2 words
    bm.setChunk(0);
    bm.setChunk(9);
    bm.setChunk(33);
    const bytes = bm.toBytes();
    expect(bytes.toString('hex')).toBe('01020000' + '02000000');
    const back = ChangeBitmap.fromBytes(bytes, 40 * 4096, 4096);
    expect(back.equals(bm)).toBe(true);
  });

  it('rejects serialized bitmaps of the wrong length or with bits past the end', () => {
    expect(() => ChangeBitmap.fromBytes(Buffer.alloc(4), 40 * 4096, 4096)).toThrow(/expected 8/);
    const bad = Buffer.from('00000000' + '00010000', 'hex'); // bit 40 set, only 40 chunks
    expect(() => ChangeBitmap.fromBytes(bad, 40 * 4096, 4096)).toThrow(/past the last chunk/);
  });

  it('rejects chunk sizes that are not powers of two >= 512', () => {
    expect(() => new ChangeBitmap(1 << 20, 3000)).toThrow(/power of two/);
    expect(() => new ChangeBitmap(1 << 20, 256)).toThrow(/power of two/);
    expect(() => new ChangeBitmap(0, 4096)).toThrow(/device size/);
  });
});
