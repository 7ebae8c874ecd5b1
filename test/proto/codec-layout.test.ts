import { describe, expect, it } from 'vitest';
import { decodeSingleFrame, DEFAULT_MAX_FRAME_BYTES, encodeFrame, FRAME_HEADER_BYTES } from '../../proto/codec.js';
import { envelope } from '../../proto/messages.js';

// Pins DESIGN.md §4.1 byte by byte: u32 LE length, then the protobuf Envelope.
describe('frame layout', () => {
  it('frozen constants', () => {
    expect(FRAME_HEADER_BYTES).toBe(4);
    expect(DEFAULT_MAX_FRAME_BYTES).toBe(8 * 1024 * 1024);
  });

  it('Ping{nonce=1} as pong is 4-byte LE length + envelope field 15', () => {
    const frame = encodeFrame(envelope('pong', { nonce: 1 }));
    // 0x7a = field 15, wire type 2; inner 08 01 = field 1 varint 1.
    expect([...frame]).toEqual([0x04, 0x00, 0x00, 0x00, 0x7a, 0x02, 0x08, 0x01]);
    expect(decodeSingleFrame(Buffer.from([0x04, 0, 0, 0, 0x7a, 0x02, 0x08, 0x01]))).toEqual({ kind: 'pong', pong: { nonce: 1 } });
  });

  it('an envelope whose message has only defaults is still set (field 8, length 0)', () => {
    expect(encodeFrame(envelope('ack', { jobId: '', seq: 0, durableNext: 0 })).toString('hex')).toBe('02000000' + '4200');
  });

  it('Ack{jobId="j", seq=5, durableNext=258}', () => {
    const frame = encodeFrame(envelope('ack', { jobId: 'j', seq: 5, durableNext: 258 }));
    expect(frame.toString('hex')).toBe(
      '0a000000' + // L = 10
        '4208' + // field 8 (ack), 8 bytes
        '0a016a' + // job_id = "j"
        '1005' + // seq = 5
        '188202', // durable_next = 258 (varint 0x82 0x02)
    );
  });

  it('the length prefix is little-endian beyond one byte', () => {
    const frame = encodeFrame(envelope('error', { jobId: '', code: 'E_X', message: 'x'.repeat(300) }));
    // Proto3 defaults (the empty job_id) are not written.
    // body: 6a b4 02 | 12 03 "E_X" | 1a ac 02 + 300 × "x"  → 3 + 308 = 311 = 0x137
    expect([...frame.subarray(0, 4)]).toEqual([0x37, 0x01, 0x00, 0x00]);
    expect(frame.subarray(4, 15).toString('hex')).toBe('6ab402' + '1203455f58' + '1aac02');
    expect(frame.subarray(15).toString()).toBe('x'.repeat(300));
    expect(frame.length).toBe(4 + 311);
  });
});
