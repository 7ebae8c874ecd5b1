import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DMAP_HEADER_BYTES, DigestMap } from '../../agent/state/digest-map.js';
import { expectDurableOrder, haveStrace, repoRoot, traceDurableWrite } from '../support/durable-write-trace.js';

const sha256 = (b: Buffer): Buffer => createHash('sha256').update(b).digest();
const IMAGE = 'img-20240506t070809z-0a1b2c3d';

describe('agent digest map', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'bsn-dmap-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('pins the layout byte by byte', () => {
    // 3 chunks of 4 KiB, the last one short.
    const digests = [Buffer.alloc(32, 0xaa), Buffer.alloc(32, 0), Buffer.alloc(32, 0xcc)];
    const map = DigestMap.create({ volumeSize: 2 * 4096 + 100, chunkSize: 4096, imageId: IMAGE, digests });
    const body = Buffer.concat(digests);
    const expected =
      '42534e444d415000' + // magic "BSNDMAP\0"
      '0100' + // version 1
      '0000' + // reserved
      '00100000' + // chunk size 4096
      '6420000000000000' + // volume size 8292
      '0300000000000000' + // chunk count 3
      Buffer.from(IMAGE, 'latin1').toString('hex') + '00'.repeat(64 - IMAGE.length) +
      sha256(body).toString('hex') +
      body.toString('hex');
    expect(map.encode().toString('hex')).toBe(expected);
    expect(map.encode().length).toBe(DMAP_HEADER_BYTES + 96);
  });

  it('create: from an array or one buffer, get() is random access, copies are independent', () => {
    const n = 1000;
    const flat = randomBytes(n * 32);
    const arr = Array.from({ length: n }, (_, i) => flat.subarray(i * 32, i * 32 + 32));
    const a = DigestMap.create({ volumeSize: n * 65536, chunkSize: 65536, imageId: IMAGE, digests: flat });
    const b = DigestMap.create({ volumeSize: n * 65536, chunkSize: 65536, imageId: IMAGE, digests: arr });
    expect(a.bytes()).toEqual(flat);
    expect(b.bytes()).toEqual(flat);
    const original = Buffer.from(flat);
    flat.fill(0); // the maps hold their own copies
    expect(a.get(999)).toEqual(original.subarray(999 * 32, 1000 * 32));
    expect(b.get(17)).toEqual(original.subarray(17 * 32, 18 * 32));
    const c = a.copy();
    c.set(17, Buffer.alloc(32, 7));
    expect(c.get(17)).toEqual(Buffer.alloc(32, 7));
    expect(a.get(17)).toEqual(b.get(17));
    expect(() => a.get(n)).toThrow(expect.objectContaining({ code: 'E_CHUNK_RANGE' }));
    expect(() => a.get(-1)).toThrow(expect.objectContaining({ code: 'E_CHUNK_RANGE' }));
    expect(() => a.set(0, Buffer.alloc(31))).toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
    const empty = DigestMap.create({ volumeSize: 10 * 4096, chunkSize: 4096, imageId: IMAGE });
    expect(empty.get(9)).toEqual(Buffer.alloc(32));
    expect(() => DigestMap.create({ volumeSize: 10 * 4096, chunkSize: 4096, imageId: IMAGE, digests: Buffer.alloc(9 * 32) }))
      .toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
    expect(() => DigestMap.create({ volumeSize: 4096, chunkSize: 3000, imageId: IMAGE })).toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
    expect(() => DigestMap.create({ volumeSize: 4096, chunkSize: 4096, imageId: 'x'.repeat(65) })).toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
    expect(() => DigestMap.create({ volumeSize: 4096, chunkSize: 4096, imageId: 'a b' })).toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
  });

  it('writes durably and reads back; the new image id replaces the old', async () => {
    const file = path.join(dir, 'volumes', 'pgdata.digests');
    const n = 5000;
    const map = DigestMap.create({ volumeSize: n * 4096 - 1, chunkSize: 4096, imageId: IMAGE, digests: randomBytes(n * 32) });
    await map.write(file);
    expect(await readdir(path.dirname(file))).toEqual(['pgdata.digests']);
    expect((await stat(file)).size).toBe(DMAP_HEADER_BYTES + n * 32);
    expect(await readFile(file)).toEqual(map.encode());
    const back = await DigestMap.read(file);
    expect([back.volumeSize, back.chunkSize, back.chunkCount, back.imageId]).toEqual([n * 4096 - 1, 4096, n, IMAGE]);
    expect(back.bytes()).toEqual(map.bytes());
    const next = back.copy();
    next.set(4999, Buffer.alloc(32, 1));
    next.setImageId('img-20240507t000000z-ffffffff');
    await next.write(file);
    const again = await DigestMap.read(file);
    expect(again.imageId).toBe('img-20240507t000000z-ffffffff');
    expect(again.get(4999)).toEqual(Buffer.alloc(32, 1));
    expect(await readdir(path.dirname(file))).toEqual(['pgdata.digests']);
  });

  it('a missing or damaged file is rejected (E_FORMAT) or ignored (null)', async () => {
    const file = path.join(dir, 'v.digests');
    expect(await DigestMap.readIfValid(file)).toBeNull();
    await expect(DigestMap.read(file)).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
    const map = DigestMap.create({ volumeSize: 100 * 4096, chunkSize: 4096, imageId: IMAGE, digests: randomBytes(100 * 32) });
    const good = map.encode();
    const damage: Array<[string, (b: Buffer) => Buffer]> = [
      ['magic', (b) => { b[3] ^= 1; return b; }],
      ['version', (b) => { b.writeUInt16LE(2, 8); return b; }],
      ['chunk size', (b) => { b.writeUInt32LE(8192, 12); return b; }],
      ['volume size', (b) => { b.writeBigUInt64LE(101n * 4096n, 16); return b; }],
      ['chunk count', (b) => { b.writeBigUInt64LE(99n, 24); return b; }],
      ['image id padding', (b) => { b[32 + 63] = 0x41; return b; }],
      ['checksum', (b) => { b[100] ^= 1; return b; }],
      ['digest bit flip', (b) => { b[DMAP_HEADER_BYTES + 50 * 32 + 5] ^= 0x10; return b; }],
      ['truncated', (b) => b.subarray(0, b.length - 32)],
      ['trailing', (b) => Buffer.concat([b, Buffer.alloc(1)])],
      ['header only', (b) => b.subarray(0, 64)],
      ['empty', () => Buffer.alloc(0)],
    ];
    for (const [name, fn] of damage) {
      await writeFile(file, fn(Buffer.from(good)));
      await expect(DigestMap.read(file), name).rejects.toMatchObject({ code: 'E_FORMAT' });
      expect(await DigestMap.readIfValid(file), name).toBeNull();
      expect(() => DigestMap.decode(fn(Buffer.from(good))), name).toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
    }
    await writeFile(file, good);
    expect((await DigestMap.readIfValid(file))?.bytes()).toEqual(map.bytes());
    await truncate(file, DMAP_HEADER_BYTES);
    expect(await DigestMap.readIfValid(file)).toBeNull();
  });

  it('a big volume is one buffer: 64 GiB at 64 KiB chunks (1 Mi chunks)', async () => {
    const n = 2 ** 20;
    const map = DigestMap.create({ volumeSize: 2 ** 36, chunkSize: 65536, imageId: IMAGE });
    expect(map.bytes().length).toBe(n * 32);
    map.set(n - 1, Buffer.alloc(32, 9));
    const file = path.join(dir, 'big.digests');
    await map.write(file);
    const back = await DigestMap.read(file);
    expect(back.chunkCount).toBe(n);
    expect(back.get(n - 1)).toEqual(Buffer.alloc(32, 9));
    expect(back.get(0)).toEqual(Buffer.alloc(32));
  });

  it.skipIf(!haveStrace)('syscalls: temp fsync, rename over the file, then directory fsync', async () => {
    const file = path.join(dir, 'pgdata.digests');
    expectDurableOrder(traceDurableWrite(dir, `import { DigestMap } from ${JSON.stringify(path.join(repoRoot, 'agent/state/digest-map.js'))};
await DigestMap.create({ volumeSize: 1 << 24, chunkSize: 4096, imageId: 'img-x' }).write(${JSON.stringify(file)});\n`,
    { target: file, tmpMark: path.join(dir, `.${path.basename(file)}.`) }));
    expect((await DigestMap.read(file)).imageId).toBe('img-x');
  });
});
