import { createHash } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isBlocksnapError } from '../../proto/errors.js';
import {
  checkTrailer,
  decodeEntry,
  decodeFooter,
  decodeHeader,
  encodeEntry,
  encodeFooter,
  encodeHeader,
  encodeTrailer,
  packRelPath,
  trailerChecksum,
  type TrailerEntry,
} from '../../appliance/store/pack-format.js';
import { PackWriter } from '../../appliance/store/pack-writer.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const seq = (from: number, n: number) => Buffer.from(Array.from({ length: n }, (_, i) => from + i));

function formatCode(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    return isBlocksnapError(e) ? e.code : 'not a BlocksnapError';
  }
  return undefined;
}

const ENTRY: TrailerEntry = {
  digest: seq(0, 32),
  offset: 0x0001020304050607, // u64 on disk; JS numbers stay below 2^53
  storedLength: 0x11223344,
  plainLength: 0x55667788,
  type: 2,
  codec: 1,
};

describe('pack format bytes', () => {
  it('pins the 16-byte header', () => {
    expect(encodeHeader()).toEqual(hex('42534e5041434b00 0100 0000 00000000'));
    expect(formatCode(() => decodeHeader(encodeHeader()))).toBeUndefined();
    expect(formatCode(() => decodeHeader(hex('42534e5041434b01 0100 0000 00000000')))).toBe('E_FORMAT');
    expect(formatCode(() => decodeHeader(hex('42534e5041434b00 0200 0000 00000000')))).toBe('E_FORMAT');
    expect(formatCode(() => decodeHeader(hex('42534e5041434b00 0100 0000 00000100')))).toBe('E_FORMAT');
  });

  it('pins the 56-byte trailer entry', () => {
    const bytes = encodeEntry(ENTRY);
    expect(bytes).toEqual(
      Buffer.concat([seq(0, 32), hex('0706050403020100 44332211 88776655 02 01 000000000000')]),
    );
    expect(decodeEntry(bytes)).toEqual(ENTRY);
    const badType = Buffer.from(bytes);
    badType[48] = 4;
    expect(formatCode(() => decodeEntry(badType))).toBe('E_FORMAT');
    const badCodec = Buffer.from(bytes);
    badCodec[49] = 2;
    expect(formatCode(() => decodeEntry(badCodec))).toBe('E_FORMAT');
    const reserved = Buffer.from(bytes);
    reserved[55] = 1;
    expect(formatCode(() => decodeEntry(reserved))).toBe('E_FORMAT');
  });

  it('pins the 40-byte footer and the trailer checksum', () => {
    const footer = { trailerOffset: 0x0a0b0c0d0e0f, entryCount: 0x01020304, trailerChecksum: seq(0xa0, 16) };
    const bytes = encodeFooter(footer);
    expect(bytes).toEqual(
      Buffer.concat([hex('0f0e0d0c0b0a0000 04030201 0100 0000'), seq(0xa0, 16), hex('42534e50454e4400')]),
    );
    expect(decodeFooter(bytes)).toEqual(footer);
    const trailer = encodeTrailer([ENTRY, { ...ENTRY, digest: seq(100, 32) }]);
    expect(trailerChecksum(trailer)).toEqual(createHash('sha256').update(trailer).digest().subarray(0, 16));
    const badMagic = Buffer.from(bytes);
    badMagic[39] = 1;
    expect(formatCode(() => decodeFooter(badMagic))).toBe('E_FORMAT');
    const badVersion = Buffer.from(bytes);
    badVersion[12] = 2;
    expect(formatCode(() => decodeFooter(badVersion))).toBe('E_FORMAT');
  });

  it('checks a trailer against its footer and file size', () => {
    const e1: TrailerEntry = { digest: seq(1, 32), offset: 16, storedLength: 10, plainLength: 10, type: 1, codec: 0 };
    const e2: TrailerEntry = { digest: seq(2, 32), offset: 26, storedLength: 4, plainLength: 9, type: 3, codec: 1 };
    const trailer = encodeTrailer([e1, e2]);
    const footer = { trailerOffset: 30, entryCount: 2, trailerChecksum: trailerChecksum(trailer) };
    const size = 30 + 112 + 40;
    expect(checkTrailer(footer, trailer, size)).toEqual([e1, e2]);
    expect(formatCode(() => checkTrailer(footer, trailer, size + 1))).toBe('E_FORMAT');
    const flipped = Buffer.from(trailer);
    flipped[5] ^= 1;
    expect(formatCode(() => checkTrailer(footer, flipped, size))).toBe('E_FORMAT');
    const outside = encodeTrailer([e1, { ...e2, storedLength: 5 }]);
    expect(formatCode(() => checkTrailer({ ...footer, trailerChecksum: trailerChecksum(outside) }, outside, size))).toBe('E_FORMAT');
  });

  it('names packs packs/HH/<id>.pack and nothing else', () => {
    const id = 'ab'.repeat(32);
    expect(packRelPath(id)).toBe(join('ab', `${id}.pack`));
    expect(formatCode(() => packRelPath('../etc/passwd'))).toBe('E_FORMAT');
    expect(formatCode(() => packRelPath('AB'.repeat(32)))).toBe('E_FORMAT');
  });
});

describe('PackWriter output', () => {
  const dirs = new TempDirs();
  afterEach(() => dirs.cleanup());

  it('writes exactly header, payloads, trailer, footer and names the file by its SHA-256', async () => {
    const base = await dirs.make();
    const w = new PackWriter(base, join(base, 'packs'), 8); // tiny buffer: payloads span several writes
    const d1 = seq(1, 32);
    const d2 = seq(50, 32);
    await w.append(d1, 1, 0, 5, Buffer.from('hello'));
    await w.append(d2, 3, 1, 77, Buffer.from('0123456789abcdef0123'));
    const done = await w.finish();

    const file = await readFile(done.path);
    const trailer = Buffer.concat([
      d1, hex('1000000000000000 05000000 05000000 01 00 000000000000'),
      d2, hex('1500000000000000 14000000 4d000000 03 01 000000000000'),
    ]);
    const expected = Buffer.concat([
      hex('42534e5041434b00 0100 0000 00000000'),
      Buffer.from('hello0123456789abcdef0123'),
      trailer,
      hex('2900000000000000 02000000 0100 0000'),
      createHash('sha256').update(trailer).digest().subarray(0, 16),
      hex('42534e50454e4400'),
    ]);
    expect(file).toEqual(expected);
    expect(done.size).toBe(expected.length);
    const id = createHash('sha256').update(expected).digest('hex');
    expect(done.id).toBe(id);
    expect(done.path).toBe(join(base, 'packs', id.slice(0, 2), `${id}.pack`));
    expect((await readdir(base)).sort()).toEqual(['packs']); // the temp file was renamed away
  });

  it('abort removes the temp file', async () => {
    const base = await dirs.make();
    const w = new PackWriter(base, join(base, 'packs'), 4);
    await w.append(seq(1, 32), 1, 0, 9, Buffer.from('some data'));
    expect((await readdir(base)).length).toBe(1);
    await w.abort();
    expect(await readdir(base)).toEqual([]);
  });
});
