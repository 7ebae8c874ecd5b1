/**
 * The restore worker hashes and writes a raw-block zstd frame where it lies
 * (agent/restore/raw-frame-view.ts) instead of decompressing it: the views
 * must be exactly the plain bytes the decoder would give, and anything that
 * is not a plain raw-block frame of that length must go to the decoder (null).
 */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { rawFrameView } from '../../agent/restore/raw-frame-view.js';
import { zstdRawFrame } from '../../appliance/restore/zstd-raw-frame.js';
import { zstdCompress, zstdDecompress } from '../../proto/shared/zstd.js';

describe('rawFrameView', () => {
  it.each([1, 255, 4096, 65536, 131072, 131073, 300_000])('a raw frame of %i bytes is seen as its plain bytes, uncopied', (n) => {
    const plain = randomBytes(n);
    const frame = zstdRawFrame(plain);
    const parts = rawFrameView(frame, n)!;
    expect(parts).not.toBeNull();
    expect(Buffer.concat(parts).equals(plain)).toBe(true);
    for (const p of parts) expect(p.buffer).toBe(frame.buffer);
  });

  it('whatever zstd itself writes: views only when they equal what the decoder gives', () => {
    for (const plain of [randomBytes(65536), Buffer.alloc(65536, 7), Buffer.concat([randomBytes(30000), Buffer.alloc(35536)])]) {
      const frame = zstdCompress(plain);
      const parts = rawFrameView(frame, plain.length);
      if (parts) expect(Buffer.concat(parts).equals(zstdDecompress(frame, plain.length))).toBe(true);
    }
    // A compressible chunk is compressed: never a view.
    expect(rawFrameView(zstdCompress(Buffer.alloc(65536, 7)), 65536)).toBeNull();
  });

  it('refuses (null: the decoder decides) another length, a truncated or extended frame, a checksum, two frames, a non-raw block', () => {
    const plain = randomBytes(5000);
    const frame = zstdRawFrame(plain);
    expect(rawFrameView(frame, 4999)).toBeNull();
    expect(rawFrameView(frame, 5001)).toBeNull();
    expect(rawFrameView(frame.subarray(0, frame.length - 1), 5000)).toBeNull();
    expect(rawFrameView(Buffer.concat([frame, Buffer.from([0])]), 5000)).toBeNull();
    expect(rawFrameView(Buffer.concat([zstdRawFrame(plain.subarray(0, 2500)), zstdRawFrame(plain.subarray(2500))]), 5000)).toBeNull();
    const checksum = Buffer.from(frame);
    checksum[4]! |= 0x04;
    expect(rawFrameView(checksum, 5000)).toBeNull();
    const rle = Buffer.from(frame);
    rle[9]! |= 0x02; // block type 1 (RLE)
    expect(rawFrameView(rle, 5000)).toBeNull();
    const magic = Buffer.from(frame);
    magic[0] = 0;
    expect(rawFrameView(magic, 5000)).toBeNull();
  });
});
