import { afterEach, describe, expect, it, vi } from 'vitest';
import { decodeSingleFrame, DEFAULT_MAX_FRAME_BYTES, encodeFrame, FrameDecoder } from '../../proto/codec.js';
import { envelope, EnvelopeType, type Envelope } from '../../proto/messages.js';
import { sampleBatch, sampleEnvelopes } from '../../proto/testing/sample-envelopes.js';

function plain(v: unknown): unknown {
  if (v instanceof Uint8Array) return { bytes: Buffer.from(v).toString('hex') };
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}

function frameOf(body: Uint8Array): Buffer {
  const head = Buffer.alloc(4);
  head.writeUInt32LE(body.length);
  return Buffer.concat([head, body]);
}

const code = (c: string) => expect.objectContaining({ code: c });

describe('FrameDecoder', () => {
  afterEach(() => vi.restoreAllMocks());

  const envs = sampleEnvelopes();
  const stream = Buffer.concat(envs.map((e) => encodeFrame(e)));
  const expected = plain(envs);

  it('decodes a stream pushed whole', () => {
    const d = new FrameDecoder();
    expect(plain(d.push(stream))).toEqual(expected);
    expect(d.buffered).toBe(0);
  });

  it('gives identical results for a split at every byte position', () => {
    for (let at = 0; at <= stream.length; at++) {
      const d = new FrameDecoder();
      const got = [...d.push(stream.subarray(0, at)), ...d.push(stream.subarray(at))];
      expect(d.buffered).toBe(0);
      expect(plain(got), `split at ${at}`).toEqual(expected);
    }
  });

  it('gives identical results 1 byte at a time, and reports what it holds', () => {
    const d = new FrameDecoder();
    const got: Envelope[] = [];
    const ends = new Set<number>();
    let off = 0;
    for (const e of envs) ends.add((off += encodeFrame(e).length));
    let sinceFrame = 0;
    for (let i = 0; i < stream.length; i++) {
      const out = d.push(stream.subarray(i, i + 1));
      got.push(...out);
      sinceFrame = ends.has(i + 1) ? 0 : sinceFrame + 1;
      expect(out.length).toBe(ends.has(i + 1) ? 1 : 0);
      expect(d.buffered).toBe(sinceFrame);
    }
    expect(plain(got)).toEqual(expected);
  });

  it('rejects a declared length above the maximum from the header alone, without allocating the body', () => {
    const alloc = vi.spyOn(Buffer, 'allocUnsafe');
    const d = new FrameDecoder(1024);
    expect(() => d.push(Buffer.from([0x01, 0x04, 0x00, 0x00]))).toThrow(code('E_FRAME_TOO_LARGE')); // 1025
    const big = new FrameDecoder();
    expect(() => big.push(Buffer.from([0xff, 0xff, 0xff]))).not.toThrow();
    expect(() => big.push(Buffer.from([0xff]))).toThrow(code('E_FRAME_TOO_LARGE'));
    expect(alloc.mock.calls.filter(([n]) => n > 1024)).toEqual([]);
  });

  it('accepts a frame of exactly the maximum', () => {
    const env = envelope('error', { jobId: '', code: 'E_X', message: 'y'.repeat(1000) });
    const frame = encodeFrame(env);
    expect(plain(new FrameDecoder(frame.length - 4).push(frame))).toEqual(plain([env]));
    expect(() => new FrameDecoder(frame.length - 5).push(frame)).toThrow(code('E_FRAME_TOO_LARGE'));
  });

  it('stays failed after an error', () => {
    const d = new FrameDecoder();
    expect(() => d.push(frameOf(Buffer.from([0xff, 0xff, 0xff])))).toThrow(code('E_FRAME_MALFORMED'));
    expect(() => d.push(encodeFrame(envelope('ping', { nonce: 1 })))).toThrow(code('E_FRAME_MALFORMED'));
  });

  it.each([
    ['empty envelope', Buffer.alloc(0)],
    ['only an unknown field', Buffer.from([0xf8, 0x06, 0x01])], // field 111 varint
    ['truncated message', EnvelopeType.encode({ error: { code: 'E_X', message: 'hello' } }).finish().subarray(0, 6)],
    ['garbage', Buffer.from('this is not protobuf at all', 'latin1')],
    ['invalid wire type', Buffer.from([0x0f, 0x00])],
    ['invalid UTF-8 in a string', Buffer.from([0x6a, 0x03, 0x12, 0x01, 0xff])],
    ['sub-message length past the end', Buffer.from([0x42, 0x7f, 0x0a, 0x01, 0x6a])],
  ])('rejects %s as E_FRAME_MALFORMED (stream and single)', (_name, body) => {
    expect(() => new FrameDecoder().push(frameOf(body))).toThrow(code('E_FRAME_MALFORMED'));
    expect(() => decodeSingleFrame(frameOf(body))).toThrow(code('E_FRAME_MALFORMED'));
  });

  it('keeps the last member when a oneof is set twice, as protobuf requires', () => {
    const body = Buffer.concat([
      EnvelopeType.encode({ ack: { jobId: 'j', seq: 1 } }).finish(),
      EnvelopeType.encode({ ping: { nonce: 9 } }).finish(),
    ]);
    expect(decodeSingleFrame(frameOf(body))).toEqual({ kind: 'ping', ping: { nonce: 9 } });
  });
});

describe('decodeSingleFrame', () => {
  const frame = encodeFrame(envelope('ping', { nonce: 7 }));

  it.each([
    ['shorter than a header', frame.subarray(0, 3)],
    ['a truncated body', frame.subarray(0, frame.length - 1)],
    ['trailing bytes', Buffer.concat([frame, Buffer.from([0])])],
    ['two frames', Buffer.concat([frame, frame])],
  ])('rejects %s as E_FRAME_MALFORMED', (_n, bytes) => {
    expect(() => decodeSingleFrame(bytes)).toThrow(code('E_FRAME_MALFORMED'));
  });

  it('rejects a declared length above the maximum as E_FRAME_TOO_LARGE', () => {
    expect(() => decodeSingleFrame(Buffer.from([0xff, 0xff, 0xff, 0xff]))).toThrow(code('E_FRAME_TOO_LARGE'));
    expect(() => decodeSingleFrame(frame, frame.length - 5)).toThrow(code('E_FRAME_TOO_LARGE'));
  });

  it('accepts a plain Uint8Array view', () => {
    const copy = new Uint8Array(frame.length + 8);
    copy.set(frame, 8);
    expect(decodeSingleFrame(copy.subarray(8))).toEqual({ kind: 'ping', ping: { nonce: 7 } });
  });
});

describe('encodeFrame', () => {
  it('rejects an envelope above the maximum with E_FRAME_TOO_LARGE', () => {
    expect(() => encodeFrame(sampleBatch('job-1', 1, 2, 4096), 8000)).toThrow(code('E_FRAME_TOO_LARGE'));
    expect(() => encodeFrame(sampleBatch('job-1', 1, 140, 65536))).toThrow(code('E_FRAME_TOO_LARGE'));
    expect(DEFAULT_MAX_FRAME_BYTES).toBeLessThan(140 * 65536);
  });

  it('rejects an envelope without a known kind', () => {
    expect(() => encodeFrame({ kind: 'nope' } as unknown as Envelope)).toThrow(code('E_INTERNAL'));
    expect(() => encodeFrame({ kind: 'ack' } as unknown as Envelope)).toThrow(code('E_INTERNAL'));
  });

  it('encodes and decodes a 4 MiB batch of 64 chunks in milliseconds, decoding without copying chunk data', () => {
    const env = sampleBatch('job-1', 1, 64, 65536);
    const times = { encode: Infinity, single: Infinity, stream: Infinity };
    for (let round = 0; round < 5; round++) {
      let t = performance.now();
      const frame = encodeFrame(env);
      times.encode = Math.min(times.encode, performance.now() - t);
      t = performance.now();
      const single = decodeSingleFrame(frame);
      times.single = Math.min(times.single, performance.now() - t);
      t = performance.now();
      const d = new FrameDecoder();
      const streamed: Envelope[] = [];
      for (let o = 0; o < frame.length; o += 65536) streamed.push(...d.push(frame.subarray(o, o + 65536)));
      times.stream = Math.min(times.stream, performance.now() - t);

      expect(frame.length).toBeGreaterThan(4 * 1024 * 1024);
      if (single.kind !== 'chunkBatch' || streamed[0]?.kind !== 'chunkBatch') throw new Error('wrong kind');
      expect(single.chunkBatch.chunks).toHaveLength(64);
      expect(single.chunkBatch.chunks[63]!.data.buffer).toBe(frame.buffer); // aliases the frame
      expect(Buffer.compare(streamed[0].chunkBatch.chunks[40]!.data, env.chunkBatch.chunks[40]!.data)).toBe(0);
    }
    console.log(`4 MiB batch: encode ${times.encode.toFixed(2)} ms, decode single ${times.single.toFixed(2)} ms, decode stream ${times.stream.toFixed(2)} ms`);
    // Generous bounds for a shared 2-core machine; a copy per field or a
    // per-byte loop would take tens to hundreds of ms.
    expect(times.encode).toBeLessThan(50);
    expect(times.single).toBeLessThan(20);
    expect(times.stream).toBeLessThan(50);
  });
});
