import { describe, expect, it } from 'vitest';
import {
  PAGE_BYTES,
  ROOT_HEADER_BYTES,
  decodeRoot,
  encodeRoot,
  imageGeometry,
  rootPageDigest,
  type ImageRoot,
} from '../../proto/shared/image-root.js';
import { chunkLength } from '../../proto/shared/volume-geometry.js';

function sample(): ImageRoot {
  // 2 full pages of 64 KiB chunks plus one 4 KiB chunk: a short last chunk
  // and a last page with a single used slot.
  const g = imageGeometry(2 * 1024 * 65536 + 4096, 65536);
  const pages = Buffer.concat([Buffer.alloc(32, 0x11), Buffer.alloc(32, 0), Buffer.alloc(32, 0x33)]);
  return { ...g, pages };
}

function expectCode(fn: () => unknown, code: string): void {
  expect(fn).toThrow(expect.objectContaining({ code }));
}

describe('image root format', () => {
  it('geometry: counts, short last chunk', () => {
    const g = imageGeometry(2 * 1024 * 65536 + 4096, 65536);
    expect(g).toEqual({ volumeSize: 134221824, chunkSize: 65536, chunkCount: 2049, pageCount: 3 });
    expect(chunkLength(g, 0)).toBe(65536);
    expect(chunkLength(g, 2048)).toBe(4096);
    expect(imageGeometry(2 ** 40, 65536)).toMatchObject({ chunkCount: 2 ** 24, pageCount: 16384 });
    expect(imageGeometry(1024 * 4096, 4096)).toMatchObject({ chunkCount: 1024, pageCount: 1 });
    expect(PAGE_BYTES).toBe(32768);
  });

  it('rejects invalid geometry', () => {
    for (const cs of [0, 2048, 8 * 1024 * 1024, 65535, 3 * 4096]) expectCode(() => imageGeometry(1 << 30, cs), 'E_FORMAT');
    for (const vs of [0, -1, 1.5, 2 ** 53]) expectCode(() => imageGeometry(vs, 65536), 'E_FORMAT');
  });

  it('pins the layout byte by byte', () => {
    const bytes = encodeRoot(sample());
    const expected =
      '42534e524f4f5400' + // magic "BSNROOT\0"
      '0100' + // version 1
      '0000' + // reserved
      '00000100' + // chunk size 65536
      '0010000800000000' + // volume size 134221824
      '0108000000000000' + // chunk count 2049
      '00040000' + // slots per page 1024
      '03000000' + // page count 3
      '11'.repeat(32) +
      '00'.repeat(32) +
      '33'.repeat(32);
    expect(bytes.toString('hex')).toBe(expected);
    expect(bytes.length).toBe(ROOT_HEADER_BYTES + 3 * 32);
  });

  it('round trips, and the decoded page list does not alias the input', () => {
    const bytes = encodeRoot(sample());
    const root = decodeRoot(bytes);
    expect(root).toEqual(sample());
    bytes[ROOT_HEADER_BYTES] ^= 0xff;
    expect(rootPageDigest(root, 0)).toEqual(Buffer.alloc(32, 0x11));
    expect(rootPageDigest(root, 2)).toEqual(Buffer.alloc(32, 0x33));
    expectCode(() => rootPageDigest(root, 3), 'E_CHUNK_RANGE');
  });

  it('refuses to encode an inconsistent root', () => {
    expectCode(() => encodeRoot({ ...sample(), pages: Buffer.alloc(64) }), 'E_FORMAT');
    expectCode(() => encodeRoot({ ...sample(), chunkCount: 2048 }), 'E_FORMAT');
  });

  it('detects every kind of damaged header', () => {
    const good = encodeRoot(sample());
    const mutate = (fn: (b: Buffer) => void): Buffer => {
      const b = Buffer.from(good);
      fn(b);
      return b;
    };
    const cases: Array<[string, Buffer]> = [
      ['short', good.subarray(0, 39)],
      ['magic', mutate((b) => (b[0] = 0x41))],
      ['version', mutate((b) => b.writeUInt16LE(2, 8))],
      ['reserved', mutate((b) => b.writeUInt16LE(1, 10))],
      ['chunk size', mutate((b) => b.writeUInt32LE(65536 * 3, 12))],
      ['volume size', mutate((b) => b.writeBigUInt64LE(2n ** 60n, 16))],
      ['chunk count', mutate((b) => b.writeBigUInt64LE(2048n, 24))],
      ['slots', mutate((b) => b.writeUInt32LE(512, 32))],
      ['page count', mutate((b) => b.writeUInt32LE(4, 36))],
      ['truncated page list', good.subarray(0, good.length - 1)],
      ['trailing bytes', Buffer.concat([good, Buffer.alloc(32)])],
    ];
    for (const [name, buf] of cases) {
      expect(() => decodeRoot(buf), name).toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
    }
  });
});
