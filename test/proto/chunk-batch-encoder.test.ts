import protobuf from 'protobufjs';
import { describe, expect, it } from 'vitest';
import { encodeChunkBatchFrame } from '../../proto/chunk-batch-encoder.js';
import { decodeSingleFrame } from '../../proto/codec.js';
import { envelope, writeEnvelopeBody, type ChunkBatch } from '../../proto/messages.js';
import { sampleBatch, sampleChunk } from '../../proto/testing/sample-envelopes.js';

/** The reference: protobufjs's own encoding of the same envelope, framed. */
function reference(b: ChunkBatch): Buffer {
  const w = protobuf.Writer.create();
  w.fixed32(0);
  writeEnvelopeBody(envelope('chunkBatch', b), w);
  const f = w.finish() as Buffer;
  f.writeUInt32LE(f.length - 4, 0);
  return f;
}

describe('direct ChunkBatch encoder', () => {
  const cases: [string, ChunkBatch][] = [
    ['a 4 MiB batch of 64 chunks', sampleBatch('job-1', 7, 64).chunkBatch],
    ['zero chunks, index 0, seq 0, empty job id', {
      jobId: '', seq: 0, chunks: [
        { index: 0, digest: Buffer.alloc(0), zero: true, data: Buffer.alloc(0), plainLength: 65536 },
        { ...sampleChunk(1, 4096), index: 127 },
        { ...sampleChunk(2, 100), index: 128 },
      ],
    }],
    ['large varints (index 2^40, seq 2^35, plain 4 MiB)', {
      jobId: 'job-ünïcode', seq: 2 ** 35, chunks: [{ ...sampleChunk(3, 300), index: 2 ** 40, plainLength: 4 << 20 }],
    }],
    ['an empty batch', { jobId: 'job-x', seq: 1, chunks: [] }],
  ];
  for (const [name, b] of cases) {
    it(`is byte-identical to protobufjs: ${name}`, () => {
      const fast = encodeChunkBatchFrame(b, 8 << 20);
      expect(fast.equals(reference(b))).toBe(true);
      const back = decodeSingleFrame(fast);
      expect(back.kind).toBe('chunkBatch');
    });
  }

  it('refuses a batch above the frame limit before allocating it', () => {
    expect(() => encodeChunkBatchFrame(sampleBatch('job-1', 1, 64).chunkBatch, 1 << 20)).toThrow(/exceeds/);
  });
});
