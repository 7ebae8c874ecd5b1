import { describe, expect, it } from 'vitest';
import { isBlocksnapError } from '../../proto/errors.js';
import {
  assertChunkSize,
  chunkCountOf,
  chunkLength,
  isValidChunkSize,
  isValidTrackingGranularity,
  MAX_CHUNK_SIZE,
  MIN_CHUNK_SIZE,
} from '../../proto/shared/volume-geometry.js';

describe('volume geometry: one chunk-size rule for both sides', () => {
  it('a chunk size is a power of two in 4 KiB..4 MiB', () => {
    for (const ok of [MIN_CHUNK_SIZE, 65536, MAX_CHUNK_SIZE]) expect(isValidChunkSize(ok)).toBe(true);
    for (const bad of [0, 2048, 4095, 5000, 65535, MAX_CHUNK_SIZE * 2, 65536.5, NaN]) expect(isValidChunkSize(bad)).toBe(false);
  });

  it('assertChunkSize throws the caller’s code and names what was checked', () => {
    for (const code of ['E_PROTOCOL', 'E_FORMAT', 'E_USAGE', 'E_CONFIG'] as const) {
      let err: unknown;
      try {
        assertChunkSize(5000, code, 'beginVolume.chunkSize');
      } catch (e) {
        err = e;
      }
      expect(isBlocksnapError(err, code)).toBe(true);
      expect((err as Error).message).toMatch(/^beginVolume\.chunkSize 5000 is not a power of two/);
    }
    expect(() => assertChunkSize(65536, 'E_PROTOCOL')).not.toThrow();
  });

  it('chunk count and the short last chunk', () => {
    expect(chunkCountOf(10 * 65536 + 1, 65536)).toBe(11);
    expect(chunkCountOf(10 * 65536, 65536)).toBe(10);
    expect(chunkLength({ volumeSize: 10 * 65536 + 1, chunkSize: 65536 }, 10)).toBe(1);
    expect(chunkLength({ volumeSize: 10 * 65536 + 1, chunkSize: 65536 }, 9)).toBe(65536);
  });

  it('the tracker granularity is a different rule: any power of two from one sector, no upper bound', () => {
    expect(isValidTrackingGranularity(512)).toBe(true);
    expect(isValidTrackingGranularity(MAX_CHUNK_SIZE * 4)).toBe(true);
    expect(isValidTrackingGranularity(256)).toBe(false);
    expect(isValidTrackingGranularity(3000)).toBe(false);
    expect(isValidChunkSize(512)).toBe(false);
  });
});
