import { describe, expect, it } from 'vitest';
import protobuf from 'protobufjs';
import { decodeSingleFrame, encodeFrame } from '../../proto/codec.js';
import { ENVELOPE_KINDS, EnvelopeType, messageOf, protoRoot, type Envelope } from '../../proto/messages.js';
import { sampleEnvelopes } from '../../proto/testing/sample-envelopes.js';

/** Bytes fields come back as Buffers; compare them as plain byte arrays. */
function plain(v: unknown): unknown {
  if (v instanceof Uint8Array) return { bytes: Array.from(v) };
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}

/** Every field name of a schema message, recursively checked against a sample object. */
function expectSchemaFields(type: protobuf.Type, obj: Record<string, unknown>, path: string): void {
  expect(Object.keys(obj).sort(), path).toEqual(type.fieldsArray.map((f) => f.name).sort());
  for (const f of type.fieldsArray) {
    f.resolve();
    if (!(f.resolvedType instanceof protobuf.Type)) continue;
    const vals = f.repeated ? (obj[f.name] as unknown[]) : [obj[f.name]];
    expect(vals.length, `${path}.${f.name} has a sample value`).toBeGreaterThan(0);
    for (const v of vals) expectSchemaFields(f.resolvedType, v as Record<string, unknown>, `${path}.${f.name}`);
  }
}

describe('messages', () => {
  const samples = sampleEnvelopes();

  it('has a sample of every envelope kind in the schema', () => {
    expect(samples.map((e) => e.kind)).toEqual(ENVELOPE_KINDS);
    expect(ENVELOPE_KINDS).toHaveLength(EnvelopeType.fieldsArray.length);
  });

  it('the sample envelopes name exactly the schema fields', () => {
    for (const env of samples) {
      const type = EnvelopeType.fields[env.kind]!.resolvedType as protobuf.Type;
      expectSchemaFields(type, messageOf(env) as unknown as Record<string, unknown>, env.kind);
    }
  });

  it.each(sampleEnvelopes().map((e) => [e.kind, e] as const))('round-trips %s', (_kind, env) => {
    const back = decodeSingleFrame(encodeFrame(env));
    expect(plain(back)).toEqual(plain(env));
  });

  it('fills proto3 defaults for absent fields and leaves absent sub-messages undefined', () => {
    const body = EnvelopeType.encode({ endVolume: {} }).finish();
    const frame = Buffer.concat([Buffer.from([body.length, 0, 0, 0]), body]);
    expect(decodeSingleFrame(frame)).toEqual({ kind: 'endVolume', endVolume: { jobId: '', nextIndex: 0, stats: undefined, expectedRoot: Buffer.alloc(0) } });
    const batch = EnvelopeType.encode({ chunkBatch: { chunks: [{}] } }).finish();
    const env = decodeSingleFrame(Buffer.concat([Buffer.from([batch.length, 0, 0, 0]), batch])) as Envelope & { kind: 'chunkBatch' };
    expect(plain(env.chunkBatch.chunks)).toEqual([{ index: 0, digest: { bytes: [] }, zero: false, data: { bytes: [] }, plainLength: 0 }]);
  });

  describe('64-bit integers', () => {
    const Ack = protoRoot.lookupType('blocksnap.v1.Ack');
    function ackFrame(durableNext: string): Buffer {
      const body = EnvelopeType.encode({ ack: Ack.fromObject({ jobId: 'j', seq: 1, durableNext }) }).finish();
      const head = Buffer.alloc(4);
      head.writeUInt32LE(body.length);
      return Buffer.concat([head, body]);
    }

    it('accepts Number.MAX_SAFE_INTEGER exactly', () => {
      const env = decodeSingleFrame(ackFrame(String(Number.MAX_SAFE_INTEGER)));
      expect(env).toMatchObject({ kind: 'ack', ack: { durableNext: Number.MAX_SAFE_INTEGER } });
    });

    it.each(['9007199254740992', '9007199254740993', '18446744073709551615'])('rejects %s as E_FRAME_MALFORMED', (v) => {
      expect(() => decodeSingleFrame(ackFrame(v))).toThrow(expect.objectContaining({ code: 'E_FRAME_MALFORMED' }));
      expect(() => decodeSingleFrame(ackFrame(v))).toThrow(/ack\.durableNext/);
    });

    it('rejects an unsafe value nested in a repeated message', () => {
      const Hello = protoRoot.lookupType('blocksnap.v1.Hello');
      const body = EnvelopeType.encode({ hello: Hello.fromObject({ agent: 'a', volumes: [{ name: 'v', size: '18014398509481984' }] }) }).finish();
      const head = Buffer.alloc(4);
      head.writeUInt32LE(body.length);
      expect(() => decodeSingleFrame(Buffer.concat([head, body]))).toThrow(/hello\.volumes\[0\]\.size/);
    });
  });
});
