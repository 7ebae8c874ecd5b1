import { createHash } from 'node:crypto';
import { envelope, JobMode, type Chunk, type Envelope, type EnvelopeOf, type TransferStats } from '../messages.js';

/**
 * One envelope of every kind with every field set to a non-default value
 * (so a field the codec dropped would show), for round-trip and transport
 * tests. Deterministic: the same call returns equal envelopes.
 */

export function sampleStats(): TransferStats {
  return {
    chunksTotal: 65536, chunksRead: 65000, chunksSent: 1200, chunksZero: 536, bytesRead: 4259840000,
    bytesSent: 2 ** 40 + 7, bytesStored: 123456789, chunksStored: 1100, freezeSeconds: 0.0125,
    snapshotSeconds: 0.25, readSeconds: 12.5, changeSource: 'digest-compare', fallbackReason: 'tracker gap',
    trackedChunks: 1250, audited: true, auditChanged: 1190, auditMissed: 3, auditExtra: 63,
  };
}

/** A chunk of `plainLength` pseudo-random bytes whose digest is real. */
export function sampleChunk(index: number, plainLength = 65536, dataBytes = plainLength): Chunk {
  const data = Buffer.alloc(dataBytes);
  for (let i = 0; i + 4 <= dataBytes; i += 4) data.writeUInt32LE((Math.imul(index + 1, 2654435761) ^ i) >>> 0, i);
  return { index, digest: createHash('sha256').update(data).digest(), zero: false, data, plainLength };
}

export function sampleBatch(jobId: string, seq: number, count: number, chunkBytes = 65536): EnvelopeOf<'chunkBatch'> {
  const chunks = Array.from({ length: count }, (_, i) => sampleChunk(i * 2 + 1, chunkBytes));
  return envelope('chunkBatch', { jobId, seq, chunks });
}

export function sampleEnvelopes(): Envelope[] {
  return [
    envelope('hello', {
      agent: 'db1', clientNonce: Buffer.alloc(24, 7), protocolVersion: 2, agentVersion: '0.1.0', instanceId: '0123456789abcdef',
      volumes: [
        { name: 'pgdata', size: 4 * 2 ** 30, chunkSize: 65536, lastImageId: 'img-abc' },
        { name: 'pgwal', size: 2 ** 52 + 3, chunkSize: 4096, lastImageId: '' },
      ],
      groups: [{ name: 'pg', volumes: ['pgdata', 'pgwal'] }],
    }),
    envelope('welcome', { sessionId: 'sess-1', maxFrameBytes: 8 << 20, windowBytes: 32 << 20, serverSignature: Buffer.alloc(32, 4) }),
    envelope('runJob', { jobId: 'job-1', volume: 'pgdata', mode: JobMode.INCREMENTAL, audit: true }),
    envelope('cancelJob', { jobId: 'job-1', reason: 'operator asked' }),
    envelope('beginVolume', {
      jobId: 'job-1', volume: 'pgdata', volumeSize: 4 * 2 ** 30, chunkSize: 65536,
      basisImageId: 'img-abc', mode: JobMode.INCREMENTAL, resume: true,
    }),
    envelope('volumeReady', { jobId: 'job-1', basisAccepted: true, resumeFrom: 4097, reason: 'resumed' }),
    envelope('chunkBatch', {
      jobId: 'job-1', seq: 2 ** 33,
      chunks: [
        sampleChunk(3, 65536, 1000),
        { index: 4, digest: Buffer.alloc(0), zero: true, data: Buffer.alloc(0), plainLength: 65536 },
        sampleChunk(2 ** 40, 4096),
      ],
    }),
    envelope('ack', { jobId: 'job-1', seq: 17, durableNext: Number.MAX_SAFE_INTEGER }),
    envelope('endVolume', { jobId: 'job-1', nextIndex: 65536, stats: sampleStats(), expectedRoot: Buffer.alloc(32, 7) }),
    envelope('committed', {
      jobId: 'job-1', imageId: 'img-def', stats: sampleStats(), setId: 'set-1',
      images: [{ volume: 'pgdata', imageId: 'img-def' }, { volume: 'pgwal', imageId: 'img-fed' }],
    }),
    envelope('jobProgress', { jobId: 'job-1', chunksDone: 100, chunksTotal: 65536, bytesSent: 6553600, phase: 'reading' }),
    envelope('jobResult', {
      jobId: 'job-1', ok: false, imageId: 'img-x', errorCode: 'E_CANCELLED', errorMessage: 'cancelled by operator',
      stats: sampleStats(),
    }),
    envelope('error', { jobId: 'job-1', code: 'E_BAD_CHUNK', message: 'digest mismatch at chunk 5 — ü' }),
    envelope('ping', { nonce: 2 ** 50 + 1 }),
    envelope('pong', { nonce: 42 }),
    envelope('pgBackupInfo', {
      jobId: 'job-1', labelFile: 'START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n', spcmapFile: '16384 /srv/ts1\n',
      startLsn: '0/2000028', stopLsn: '0/2000138', timeline: 1, replayLsn: '0/2000100', exclusive: true, serverVersion: 150010,
      role: 'standby', pausedSeconds: 0.25, backupSeconds: 1.5, walSegmentSize: 16 << 20,
    }),
    envelope('walPiece', {
      jobId: 'job-1', fileName: '000000010000000000000002', offset: 4 << 20, data: Buffer.from([1, 2, 3]), plainLength: 4 << 20,
      digest: Buffer.alloc(32, 7), fileSize: 16 << 20,
    }),
    envelope('commitSet', { jobId: 'job-1' }),
    envelope('authChallenge', { salt: Buffer.alloc(16, 1), iterations: 4096, serverNonce: Buffer.alloc(24, 2) }),
    envelope('authProof', { clientProof: Buffer.alloc(32, 3) }),
    envelope('mountRequest', { requestId: 'mrq-1', imageId: 'img-def', writable: true, ttlSeconds: 3600 }),
    envelope('mountGranted', {
      requestId: 'mrq-1', mountId: 'mnt-1', nbdPort: 10809, tls: true, imageId: 'img-def', writable: true, expiresAt: '2026-01-01T00:00:00.000Z',
      exports: [{
        volume: 'pgdata', imageId: 'img-def', exportName: 'a'.repeat(32), size: 2 ** 33, chunkSize: 65536,
        pg: { labelFile: 'START WAL LOCATION: 0/2000028\n', spcmapFile: '', stopLsn: '0/2000138', timeline: 1, serverVersion: 150010, role: 'primary', wal: ['000000010000000000000002'] },
      }],
    }),
    envelope('mountRelease', { mountId: 'mnt-1', reason: 'unmounted' }),
    envelope('walFetch', { mountId: 'mnt-1', name: '000000010000000000000002' }),
    envelope('runMount', { requestId: 'mrq-2', imageId: 'img-def', pgPort: 5499, target: '/srv/copy', asStandby: true, writable: true, verify: true }),
    envelope('mountResult', {
      requestId: 'mrq-2', ok: true, errorCode: '', errorMessage: '', mountId: 'mnt-1', connection: 'host=/tmp port=5499 dbname=postgres',
      secondsToFirstQuery: 1.25, target: '/srv/copy', pgPort: 5499,
      check: {
        ok: false, method: 'amcheck (SQL)', serverVersion: 150004, databases: 2, heapsChecked: 40, indexesChecked: 31, seconds: 0.75,
        tables: [{ database: 'postgres', schema: 'public', table: 'tick', rows: 1234 }],
        problems: [{ database: 'postgres', relation: 'tick_pkey', message: 'item order invariant violated' }],
      },
    }),
    envelope('restoreRequest', { requestId: 'rst-0123456789abcdef', imageId: 'img-def', changedOnly: true }),
    envelope('restoreMap', {
      requestId: 'rst-0123456789abcdef', imageId: 'img-def', volume: 'pgdata', volumeSize: 2 ** 33, chunkSize: 65536,
      rootDigest: Buffer.alloc(32, 4), firstIndex: 1024, digests: Buffer.alloc(64, 5), last: true,
    }),
    envelope('restoreWant', { requestId: 'rst-0123456789abcdef', ranges: [{ first: 3, count: 2 }, { first: 9, count: 1 }], last: true }),
    envelope('restoreChunks', {
      requestId: 'rst-0123456789abcdef', seq: 2,
      chunks: [{ index: 3, digest: Buffer.alloc(32, 6), zero: false, data: Buffer.from([9, 9]), plainLength: 65536 }],
    }),
    envelope('restoreAck', { requestId: 'rst-0123456789abcdef', seq: 2 }),
    envelope('restoreEnd', { requestId: 'rst-0123456789abcdef', ok: false, code: 'E_DIGEST_MISMATCH', message: 'chunk 3' }),
  ];
}
