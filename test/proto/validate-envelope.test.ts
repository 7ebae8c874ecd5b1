import { describe, expect, it } from 'vitest';
import { decodeSingleFrame, encodeFrame, validateEnvelope } from '../../proto/codec.js';
import { emptyTransferStats, envelope, JobMode, type Chunk, type Envelope } from '../../proto/messages.js';
import { sampleChunk, sampleEnvelopes } from '../../proto/testing/sample-envelopes.js';

const code = (c: string) => expect.objectContaining({ code: c });
const batch = (chunks: Chunk[]) => envelope('chunkBatch', { jobId: 'job-1', seq: 1, chunks });
const zeroChunk = (index: number, digest: Uint8Array = Buffer.alloc(0)): Chunk => ({
  index, digest, zero: true, data: Buffer.alloc(0), plainLength: 65536,
});

describe('validateEnvelope', () => {
  it.each(sampleEnvelopes().map((e) => [e.kind, e] as const))('accepts the sample %s, also after a round trip', (_k, env) => {
    expect(() => validateEnvelope(env)).not.toThrow();
    expect(() => validateEnvelope(decodeSingleFrame(encodeFrame(env)))).not.toThrow();
  });

  it('accepts zero chunks with an empty or ZERO digest', () => {
    expect(() => validateEnvelope(batch([zeroChunk(1), zeroChunk(2, Buffer.alloc(32))]))).not.toThrow();
  });

  it.each<[string, Chunk[]]>([
    ['a 31-byte digest', [{ ...sampleChunk(1), digest: Buffer.alloc(31, 1) }]],
    ['a 33-byte digest', [{ ...sampleChunk(1), digest: Buffer.alloc(33, 1) }]],
    ['a ZERO digest on data', [{ ...sampleChunk(1), digest: Buffer.alloc(32) }]],
    ['no data on a non-zero chunk', [{ ...sampleChunk(1), data: Buffer.alloc(0) }]],
    ['data on a zero chunk', [{ ...zeroChunk(1), data: Buffer.from([1]) }]],
    ['a non-ZERO digest on a zero chunk', [zeroChunk(1, Buffer.alloc(32, 7))]],
    ['plainLength 0', [{ ...sampleChunk(1), plainLength: 0 }]],
    ['plainLength above 4 MiB', [{ ...sampleChunk(1), plainLength: 4 * 1024 * 1024 + 1 }]],
    ['repeated index', [sampleChunk(5), sampleChunk(5)]],
    ['decreasing index', [sampleChunk(5), sampleChunk(4)]],
  ])('rejects a chunk with %s as E_BAD_CHUNK', (_n, chunks) => {
    expect(() => validateEnvelope(batch(chunks))).toThrow(code('E_BAD_CHUNK'));
  });

  const begin = {
    jobId: 'job-1', volume: 'pgdata', volumeSize: 1 << 30, chunkSize: 65536, basisImageId: '', mode: JobMode.FULL, resume: false,
  };
  it.each<[string, Envelope]>([
    ['an empty batch', batch([])],
    ['a batch without job id', envelope('chunkBatch', { jobId: '', seq: 1, chunks: [sampleChunk(1)] })],
    ['a hello without agent', envelope('hello', { agent: '', clientNonce: Buffer.alloc(24, 1), protocolVersion: 2, agentVersion: '', volumes: [], instanceId: '' })],
    ['a 257-character agent name', envelope('hello', { agent: 'a'.repeat(257), clientNonce: Buffer.alloc(24, 1), protocolVersion: 2, agentVersion: '', volumes: [], instanceId: '' })],
    ['a control character in an id', envelope('runJob', { jobId: 'job\n1', volume: 'v', mode: JobMode.FULL, audit: false })],
    ['mode UNSPECIFIED', envelope('runJob', { jobId: 'job-1', volume: 'v', mode: JobMode.UNSPECIFIED, audit: false })],
    ['an unknown mode', envelope('runJob', { jobId: 'job-1', volume: 'v', mode: 7 as JobMode, audit: false })],
    ['chunk size not a power of two', envelope('beginVolume', { ...begin, chunkSize: 65535 })],
    ['chunk size 2 KiB', envelope('beginVolume', { ...begin, chunkSize: 2048 })],
    ['chunk size 8 MiB', envelope('beginVolume', { ...begin, chunkSize: 8 << 20 })],
    ['volume size 0', envelope('beginVolume', { ...begin, volumeSize: 0 })],
    ['an incremental without basis', envelope('beginVolume', { ...begin, mode: JobMode.INCREMENTAL })],
    ['an error without code', envelope('error', { jobId: '', code: '', message: 'x' })],
    ['an error code of the wrong shape', envelope('error', { jobId: '', code: 'bad code', message: 'x' })],
    ['a 4097-character error message', envelope('error', { jobId: '', code: 'E_X', message: 'x'.repeat(4097) })],
    ['a failed job result without code', envelope('jobResult', { jobId: 'j', ok: false, imageId: '', errorCode: '', errorMessage: '' })],
    ['an ok job result without image', envelope('jobResult', { jobId: 'j', ok: true, imageId: '', errorCode: '', errorMessage: '' })],
    ['negative freeze seconds', envelope('endVolume', { jobId: 'j', nextIndex: 1, stats: { ...emptyTransferStats(), freezeSeconds: -1 }, expectedRoot: Buffer.alloc(32) })],
    ['an EndVolume without the expected root', envelope('endVolume', { jobId: 'j', nextIndex: 1, expectedRoot: Buffer.alloc(0) })],
    ['an EndVolume with a 31-byte root', envelope('endVolume', { jobId: 'j', nextIndex: 1, expectedRoot: Buffer.alloc(31) })],
    ['NaN read seconds', envelope('committed', { jobId: 'j', imageId: 'img-1', stats: { ...emptyTransferStats(), readSeconds: NaN } })],
    ['a welcome without window', envelope('welcome', { sessionId: 's', maxFrameBytes: 1 << 20, windowBytes: 0, serverSignature: Buffer.alloc(32) })],
    ['a welcome without the server signature', envelope('welcome', { sessionId: 's', maxFrameBytes: 1 << 20, windowBytes: 1 << 20, serverSignature: Buffer.alloc(0) })],
    ['a hello without client nonce', envelope('hello', { agent: 'db1', clientNonce: Buffer.alloc(0), protocolVersion: 2, agentVersion: '', volumes: [], instanceId: '' })],
    ['a hello with a 15-byte client nonce', envelope('hello', { agent: 'db1', clientNonce: Buffer.alloc(15), protocolVersion: 2, agentVersion: '', volumes: [], instanceId: '' })],
    ['a challenge of 1000 iterations', envelope('authChallenge', { salt: Buffer.alloc(16), iterations: 1000, serverNonce: Buffer.alloc(24) })],
    ['a challenge of 2^31 iterations (an agent would spin)', envelope('authChallenge', { salt: Buffer.alloc(16), iterations: 2 ** 31, serverNonce: Buffer.alloc(24) })],
    ['a challenge without salt', envelope('authChallenge', { salt: Buffer.alloc(0), iterations: 4096, serverNonce: Buffer.alloc(24) })],
    ['a challenge without server nonce', envelope('authChallenge', { salt: Buffer.alloc(16), iterations: 4096, serverNonce: Buffer.alloc(0) })],
    ['a 31-byte client proof', envelope('authProof', { clientProof: Buffer.alloc(31) })],
  ])('rejects %s as E_PROTOCOL', (_n, env) => {
    expect(() => validateEnvelope(env)).toThrow(code('E_PROTOCOL'));
  });
});
