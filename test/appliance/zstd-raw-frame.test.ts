/**
 * The restore server wraps chunks the store keeps plain in raw zstd blocks
 * instead of compressing them again: the frame must decode (with the
 * project's bounded decoder, which checks the declared size) to exactly the
 * plain bytes, across the 128 KiB block limit.
 */
import { describe, expect, it } from 'vitest';
import { zstdRawFrame } from '../../appliance/restore/zstd-raw-frame.js';
import { zstdDeclaredSize, zstdDecompress } from '../../proto/shared/zstd.js';
import { randomChunk } from '../../appliance/testing/store-fixtures.js';

describe('zstdRawFrame', () => {
  it.each([0, 1, 255, 256, 65536, 131071, 131072, 131073, 300_000])('%i bytes decode to themselves, size declared', (n) => {
    const plain = randomChunk(n);
    const frame = zstdRawFrame(plain);
    expect(zstdDeclaredSize(frame)).toBe(n);
    expect(zstdDecompress(frame, n).equals(plain)).toBe(true);
    expect(frame.length).toBe(9 + 3 * Math.max(1, Math.ceil(n / 131072)) + n);
  });

  it('a frame is refused for any other expected length (the agent checks the chunk length)', () => {
    const frame = zstdRawFrame(randomChunk(65536));
    expect(() => zstdDecompress(frame, 65535)).toThrow();
    expect(() => zstdDecompress(frame, 65537)).toThrow();
  });
});
