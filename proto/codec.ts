import protobuf from 'protobufjs';
import { encodeChunkBatchFrame } from './chunk-batch-encoder.js';
import { BlocksnapError } from './errors.js';
import { decodeEnvelopeBody, JobMode, writeEnvelopeBody, type Chunk, type Envelope, type TransferStats } from './messages.js';
import { KEY_BYTES, MAX_NONCE_BYTES, MIN_NONCE_BYTES, SCRAM_MAX_ITERATIONS, SCRAM_MIN_ITERATIONS } from './scram.js';
import { assertChunkSize, MAX_CHUNK_SIZE } from './shared/volume-geometry.js';
import { validateRestoreMessage } from './shared/restore-protocol.js';

/**
 * Frame codec (DESIGN.md §4.1). Pure: no sockets, no timers.
 *
 *   offset  size  field
 *   0       4     length L of the envelope (u32 little-endian, L ≤ maxFrameBytes)
 *   4       L     protobuf blocksnap.v1.Envelope
 *
 * A WebSocket message holds exactly one frame (decodeSingleFrame); a byte
 * stream is a sequence of frames (FrameDecoder).
 */

export const FRAME_HEADER_BYTES = 4;
export const DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024;

/**
 * Encodes one frame. The length prefix is reserved in the same protobuf
 * writer and patched afterwards, so a 4 MiB chunk batch is copied exactly
 * once (chunk data → frame buffer). Throws E_FRAME_TOO_LARGE before
 * allocating the frame when the envelope exceeds `maxFrameBytes`.
 */
export function encodeFrame(env: Envelope, maxFrameBytes = DEFAULT_MAX_FRAME_BYTES, alloc?: (n: number) => Buffer): Buffer {
  // The hot path (every chunk of every backup and restore) has its own encoder (same bytes), into `alloc`'s buffer when given.
  if (env.kind === 'chunkBatch') return encodeChunkBatchFrame(env.chunkBatch, maxFrameBytes, 7, alloc);
  if (env.kind === 'restoreChunks') return encodeChunkBatchFrame({ jobId: env.restoreChunks.requestId, seq: env.restoreChunks.seq, chunks: env.restoreChunks.chunks }, maxFrameBytes, 53, alloc);
  const writer = protobuf.Writer.create();
  writer.fixed32(0);
  writeEnvelopeBody(env, writer);
  const bodyLen = writer.len - FRAME_HEADER_BYTES;
  if (bodyLen > maxFrameBytes) {
    throw new BlocksnapError('E_FRAME_TOO_LARGE', `${env.kind} envelope of ${bodyLen} bytes exceeds the ${maxFrameBytes} byte frame limit`);
  }
  const frame = writer.finish() as Buffer;
  frame.writeUInt32LE(bodyLen, 0);
  return frame;
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function checkLength(len: number, maxFrameBytes: number): void {
  if (len > maxFrameBytes) {
    throw new BlocksnapError('E_FRAME_TOO_LARGE', `declared frame length ${len} exceeds the ${maxFrameBytes} byte limit`);
  }
}

/**
 * Decodes a message that must hold exactly one whole frame (WebSocket).
 * Decoded `bytes` fields alias `bytes`: do not modify it afterwards.
 */
export function decodeSingleFrame(bytes: Uint8Array, maxFrameBytes = DEFAULT_MAX_FRAME_BYTES): Envelope {
  const buf = asBuffer(bytes);
  if (buf.length < FRAME_HEADER_BYTES) {
    throw new BlocksnapError('E_FRAME_MALFORMED', `message of ${buf.length} bytes is shorter than a frame header`);
  }
  const len = buf.readUInt32LE(0);
  checkLength(len, maxFrameBytes);
  if (buf.length !== FRAME_HEADER_BYTES + len) {
    throw new BlocksnapError('E_FRAME_MALFORMED', `message of ${buf.length} bytes does not hold exactly one frame of ${len} bytes`);
  }
  return decodeEnvelopeBody(buf.subarray(FRAME_HEADER_BYTES));
}

/**
 * Incremental decoder for a byte stream split anywhere. A frame that lies
 * whole inside one pushed chunk is decoded in place (its `bytes` fields alias
 * the chunk: do not reuse pushed buffers); a frame spread over several
 * chunks is assembled into one buffer of its declared size, allocated only
 * after that size passed the limit check. The first error is sticky: every
 * later push throws it again, and envelopes decoded earlier in the failing
 * push are dropped, because a stream is unusable after a bad frame.
 */
export class FrameDecoder {
  private readonly header = Buffer.alloc(FRAME_HEADER_BYTES);
  private headerFill = 0;
  private body: Buffer | null = null;
  private bodyFill = 0;
  private failure: BlocksnapError | null = null;

  constructor(private readonly maxFrameBytes = DEFAULT_MAX_FRAME_BYTES) {}

  /** Bytes held that do not yet form a whole frame. */
  get buffered(): number {
    return this.headerFill + this.bodyFill;
  }

  push(bytes: Uint8Array): Envelope[] {
    if (this.failure) throw this.failure;
    try {
      return this.consume(asBuffer(bytes));
    } catch (e) {
      this.failure = e instanceof BlocksnapError ? e : new BlocksnapError('E_FRAME_MALFORMED', String(e), { cause: e });
      this.body = null;
      throw this.failure;
    }
  }

  private consume(chunk: Buffer): Envelope[] {
    const out: Envelope[] = [];
    let pos = 0;
    while (pos < chunk.length) {
      if (this.body === null) {
        let len: number;
        if (this.headerFill === 0 && chunk.length - pos >= FRAME_HEADER_BYTES) {
          len = chunk.readUInt32LE(pos);
          pos += FRAME_HEADER_BYTES;
          this.headerFill = FRAME_HEADER_BYTES;
        } else {
          const n = Math.min(FRAME_HEADER_BYTES - this.headerFill, chunk.length - pos);
          chunk.copy(this.header, this.headerFill, pos, pos + n);
          this.headerFill += n;
          pos += n;
          if (this.headerFill < FRAME_HEADER_BYTES) break;
          len = this.header.readUInt32LE(0);
        }
        checkLength(len, this.maxFrameBytes);
        if (chunk.length - pos >= len) {
          // Fast path: the whole body is in this chunk.
          this.headerFill = 0;
          out.push(decodeEnvelopeBody(chunk.subarray(pos, pos + len)));
          pos += len;
          continue;
        }
        this.body = Buffer.allocUnsafe(len);
        this.bodyFill = 0;
      }
      const n = Math.min(this.body.length - this.bodyFill, chunk.length - pos);
      chunk.copy(this.body, this.bodyFill, pos, pos + n);
      this.bodyFill += n;
      pos += n;
      if (this.bodyFill === this.body.length) {
        const body = this.body;
        this.body = null;
        this.bodyFill = 0;
        this.headerFill = 0;
        out.push(decodeEnvelopeBody(body));
      }
    }
    return out;
  }
}

/**
 * Field-shape checks every receiver needs before acting on a message: ids
 * present and bounded, enum values known, chunk digests and lengths well
 * formed. Semantic checks (index < chunk count, the job belongs to this
 * agent, sizes against the volume) stay with the receiver. Throws
 * E_BAD_CHUNK for a malformed chunk, E_PROTOCOL for anything else.
 */
export function validateEnvelope(env: Envelope): void {
  switch (env.kind) {
    case 'hello': {
      const m = env.hello;
      id(m.agent, 'hello.agent', true);
      bytesIn(m.clientNonce, MIN_NONCE_BYTES, MAX_NONCE_BYTES, 'hello.clientNonce');
      id(m.agentVersion, 'hello.agentVersion', false);
      id(m.instanceId, 'hello.instanceId', false);
      if (m.volumes.length > MAX_VOLUMES) fail(`hello.volumes has ${m.volumes.length} entries (max ${MAX_VOLUMES})`);
      m.volumes.forEach((v, i) => {
        id(v.name, `hello.volumes[${i}].name`, true);
        id(v.lastImageId, `hello.volumes[${i}].lastImageId`, false);
        if (v.chunkSize !== 0) chunkSize(v.chunkSize, `hello.volumes[${i}].chunkSize`);
      });
      const groups = m.groups ?? [];
      if (groups.length > MAX_VOLUMES) fail(`hello.groups has ${groups.length} entries (max ${MAX_VOLUMES})`);
      groups.forEach((g, i) => {
        id(g.name, `hello.groups[${i}].name`, true);
        if (g.volumes.length === 0 || g.volumes.length > MAX_GROUP) fail(`hello.groups[${i}] must have 1..${MAX_GROUP} volumes`);
        g.volumes.forEach((v, j) => id(v, `hello.groups[${i}].volumes[${j}]`, true));
      });
      return;
    }
    case 'welcome':
      id(env.welcome.sessionId, 'welcome.sessionId', true);
      if (env.welcome.maxFrameBytes <= 0 || env.welcome.windowBytes <= 0) fail('welcome limits must be positive');
      bytesIn(env.welcome.serverSignature, KEY_BYTES, KEY_BYTES, 'welcome.serverSignature');
      return;
    case 'authChallenge': {
      const m = env.authChallenge;
      bytesIn(m.salt, 8, 64, 'authChallenge.salt');
      bytesIn(m.serverNonce, MIN_NONCE_BYTES, MAX_NONCE_BYTES, 'authChallenge.serverNonce');
      if (m.iterations < SCRAM_MIN_ITERATIONS || m.iterations > SCRAM_MAX_ITERATIONS) {
        fail(`authChallenge.iterations ${m.iterations} is outside ${SCRAM_MIN_ITERATIONS}..${SCRAM_MAX_ITERATIONS}`);
      }
      return;
    }
    case 'authProof':
      bytesIn(env.authProof.clientProof, KEY_BYTES, KEY_BYTES, 'authProof.clientProof');
      return;
    case 'runJob':
      id(env.runJob.jobId, 'runJob.jobId', true);
      id(env.runJob.volume, 'runJob.volume', true);
      mode(env.runJob.mode, 'runJob.mode');
      return;
    case 'cancelJob':
      id(env.cancelJob.jobId, 'cancelJob.jobId', true);
      text(env.cancelJob.reason, 'cancelJob.reason');
      return;
    case 'beginVolume': {
      const m = env.beginVolume;
      id(m.jobId, 'beginVolume.jobId', true);
      id(m.volume, 'beginVolume.volume', true);
      id(m.basisImageId, 'beginVolume.basisImageId', false);
      chunkSize(m.chunkSize, 'beginVolume.chunkSize');
      mode(m.mode, 'beginVolume.mode');
      if (m.volumeSize <= 0) fail('beginVolume.volumeSize must be positive');
      if (m.mode === JobMode.INCREMENTAL && m.basisImageId === '') fail('beginVolume: incremental without basisImageId');
      return;
    }
    case 'volumeReady':
      id(env.volumeReady.jobId, 'volumeReady.jobId', true);
      text(env.volumeReady.reason, 'volumeReady.reason');
      return;
    case 'chunkBatch':
      id(env.chunkBatch.jobId, 'chunkBatch.jobId', true);
      chunks(env.chunkBatch.chunks);
      return;
    case 'ack':
      id(env.ack.jobId, 'ack.jobId', true);
      return;
    case 'endVolume':
      id(env.endVolume.jobId, 'endVolume.jobId', true);
      stats(env.endVolume.stats, 'endVolume.stats');
      if (env.endVolume.expectedRoot.length !== DIGEST_BYTES) fail(`endVolume.expectedRoot must be ${DIGEST_BYTES} bytes`);
      return;
    case 'committed':
      id(env.committed.jobId, 'committed.jobId', true);
      id(env.committed.imageId, 'committed.imageId', true);
      stats(env.committed.stats, 'committed.stats');
    {
      const images = env.committed.images ?? [];
      id(env.committed.setId ?? '', 'committed.setId', false);
      if (images.length > MAX_GROUP) fail(`committed.images has more than ${MAX_GROUP} entries`);
      images.forEach((m, i) => {
        id(m.volume, `committed.images[${i}].volume`, true);
        id(m.imageId, `committed.images[${i}].imageId`, true);
      });
      if (images.length > 0 && !env.committed.setId) fail('committed: member images without a setId');
      return;
    }
    case 'commitSet':
      id(env.commitSet.jobId, 'commitSet.jobId', true);
      return;
    case 'jobProgress':
      id(env.jobProgress.jobId, 'jobProgress.jobId', true);
      id(env.jobProgress.phase, 'jobProgress.phase', false);
      return;
    case 'jobResult': {
      const m = env.jobResult;
      id(m.jobId, 'jobResult.jobId', true);
      if (m.ok) {
        id(m.imageId, 'jobResult.imageId', true);
        if (m.errorCode !== '') fail('jobResult: ok with an errorCode');
      } else {
        id(m.imageId, 'jobResult.imageId', false);
        errorCode(m.errorCode, 'jobResult.errorCode');
      }
      text(m.errorMessage, 'jobResult.errorMessage');
      stats(m.stats, 'jobResult.stats');
      return;
    }
    case 'error':
      id(env.error.jobId, 'error.jobId', false);
      errorCode(env.error.code, 'error.code');
      text(env.error.message, 'error.message');
      return;
    case 'ping':
    case 'pong':
      return;
    case 'pgBackupInfo': {
      const m = env.pgBackupInfo;
      id(m.jobId, 'pgBackupInfo.jobId', true);
      // A label is a few hundred bytes; a tablespace map one line per tablespace.
      if (m.labelFile.length > 65536) fail('pgBackupInfo.labelFile is longer than 64 KiB');
      if (m.spcmapFile.length > 1 << 20) fail('pgBackupInfo.spcmapFile is longer than 1 MiB');
      for (const [k, v] of [['startLsn', m.startLsn], ['stopLsn', m.stopLsn], ['replayLsn', m.replayLsn]] as const) {
        if (v !== '' && !/^[0-9A-F]{1,8}\/[0-9A-F]{1,8}$/.test(v)) fail(`pgBackupInfo.${k} is not an LSN`);
      }
      if (m.role !== 'primary' && m.role !== 'standby') fail('pgBackupInfo.role must be primary or standby');
      const seg = m.walSegmentSize;
      if (seg !== 0 && (seg < 1 << 20 || seg > 1 << 30 || (seg & (seg - 1)) !== 0)) fail('pgBackupInfo.walSegmentSize is not a power of two in 1 MiB..1 GiB');
      for (const [k, v] of [['pausedSeconds', m.pausedSeconds], ['backupSeconds', m.backupSeconds]] as const) {
        if (!Number.isFinite(v) || v < 0) fail(`pgBackupInfo.${k} must be a finite number ≥ 0`);
      }
      return;
    }
    case 'walPiece': {
      const m = env.walPiece;
      id(m.jobId, 'walPiece.jobId', true);
      if (!/^[0-9A-F]{24}$/.test(m.fileName)) fail('walPiece.fileName is not a WAL segment name');
      if (m.digest.length !== DIGEST_BYTES) fail(`walPiece.digest must be ${DIGEST_BYTES} bytes`);
      if (m.plainLength < 1 || m.plainLength > MAX_CHUNK) fail('walPiece.plainLength must be 1..4 MiB');
      if (m.fileSize < 1 || m.fileSize > 1 << 30 || m.offset + m.plainLength > m.fileSize) fail('walPiece range outside the file');
      return;
    }
    // Instant mount (DESIGN.md §4.5): shapes here, ownership and state in appliance/mounts/mount-protocol.ts.
    case 'mountRequest':
      id(env.mountRequest.requestId, 'mountRequest.requestId', true);
      id(env.mountRequest.imageId, 'mountRequest.imageId', true);
      if (env.mountRequest.ttlSeconds > MAX_MOUNT_TTL) fail(`mountRequest.ttlSeconds is above ${MAX_MOUNT_TTL}`);
      return;
    case 'mountGranted': {
      const m = env.mountGranted;
      id(m.requestId, 'mountGranted.requestId', true);
      id(m.mountId, 'mountGranted.mountId', true);
      id(m.imageId, 'mountGranted.imageId', true);
      id(m.expiresAt, 'mountGranted.expiresAt', false);
      if (m.nbdPort < 1 || m.nbdPort > 65535) fail('mountGranted.nbdPort must be 1..65535');
      if (m.exports.length < 1 || m.exports.length > MAX_GROUP) fail(`mountGranted.exports must have 1..${MAX_GROUP} entries`);
      m.exports.forEach((x, i) => {
        id(x.volume, `mountGranted.exports[${i}].volume`, true);
        id(x.imageId, `mountGranted.exports[${i}].imageId`, true);
        if (!/^[a-z0-9]{26,64}$/.test(x.exportName)) fail(`mountGranted.exports[${i}].exportName is not an export name`);
        if (x.size <= 0) fail(`mountGranted.exports[${i}].size must be positive`);
        chunkSize(x.chunkSize, `mountGranted.exports[${i}].chunkSize`);
        if (x.pg) {
          if (x.pg.labelFile.length > 65536 || x.pg.spcmapFile.length > 1 << 20) fail(`mountGranted.exports[${i}].pg label or map too long`);
          if (x.pg.stopLsn !== '' && !/^[0-9A-F]{1,8}\/[0-9A-F]{1,8}$/.test(x.pg.stopLsn)) fail(`mountGranted.exports[${i}].pg.stopLsn is not an LSN`);
          if (x.pg.role !== 'primary' && x.pg.role !== 'standby') fail(`mountGranted.exports[${i}].pg.role`);
          if (x.pg.wal.length > 64) fail(`mountGranted.exports[${i}].pg.wal has more than 64 segments`);
          x.pg.wal.forEach((w) => { if (!/^[0-9A-F]{24}$/.test(w)) fail(`mountGranted.exports[${i}].pg.wal: not a WAL segment name`); });
        }
      });
      return;
    }
    case 'mountRelease':
      id(env.mountRelease.mountId, 'mountRelease.mountId', true);
      text(env.mountRelease.reason, 'mountRelease.reason');
      return;
    case 'walFetch':
      id(env.walFetch.mountId, 'walFetch.mountId', true);
      if (!/^[0-9A-F]{24}$/.test(env.walFetch.name)) fail('walFetch.name is not a WAL segment name');
      return;
    case 'runMount':
      id(env.runMount.requestId, 'runMount.requestId', true);
      id(env.runMount.imageId, 'runMount.imageId', true);
      if (env.runMount.pgPort > 65535) fail('runMount.pgPort must be 0..65535');
      text(env.runMount.target, 'runMount.target', 1024);
      return;
    case 'mountResult': {
      const m = env.mountResult;
      id(m.requestId, 'mountResult.requestId', true);
      id(m.mountId, 'mountResult.mountId', false);
      if (!m.ok) errorCode(m.errorCode, 'mountResult.errorCode');
      else if (m.errorCode !== '') fail('mountResult: ok with an errorCode');
      text(m.errorMessage, 'mountResult.errorMessage');
      text(m.connection, 'mountResult.connection', 1024);
      text(m.target, 'mountResult.target', 1024);
      if (!Number.isFinite(m.secondsToFirstQuery) || m.secondsToFirstQuery < 0) fail('mountResult.secondsToFirstQuery must be a finite number ≥ 0');
      if (m.pgPort > 65535) fail('mountResult.pgPort must be 0..65535');
      if (m.check) {
        // A restore check (verify --restore): bounded lists of bounded names.
        const c = m.check;
        text(c.method, 'mountResult.check.method', 1024);
        if (c.tables.length > 100_000) fail('mountResult.check.tables has more than 100000 entries');
        if (c.problems.length > 1000) fail('mountResult.check.problems has more than 1000 entries');
        for (const t of c.tables) for (const v of [t.database, t.schema, t.table]) text(v, 'mountResult.check.tables[]', 256);
        for (const p of c.problems) {
          text(p.database, 'mountResult.check.problems[].database', 256);
          text(p.relation, 'mountResult.check.problems[].relation', 1024);
          text(p.message, 'mountResult.check.problems[].message', 4096);
        }
        if (!Number.isFinite(c.seconds) || c.seconds < 0) fail('mountResult.check.seconds must be a finite number ≥ 0');
      }
      return;
    }
    // Restore (DESIGN.md §4.6): shapes here, bounds and state in proto/shared/restore-protocol.ts.
    case 'restoreRequest':
    case 'restoreMap':
    case 'restoreWant':
    case 'restoreAck':
    case 'restoreEnd':
      return validateRestoreMessage(env);
    case 'restoreChunks':
      id(env.restoreChunks.requestId, 'restoreChunks.requestId', true);
      chunks(env.restoreChunks.chunks);
      return;
  }
}

/** A mount may ask for at most a year of life; 0 is no expiry. */
const MAX_MOUNT_TTL = 366 * 86400;

const MAX_ID = 256;
const MAX_TEXT = 4096;
const MAX_VOLUMES = 1024;
/** Members of one consistency group: each is frozen at once, so a handful, not hundreds. */
const MAX_GROUP = 64;
/** A chunk's or WAL piece's plain bytes are bounded by the largest chunk size. */
const MAX_CHUNK = MAX_CHUNK_SIZE;
const DIGEST_BYTES = 32;
const CONTROL_CHARS = /[\u0000-\u001f\u007f]/;
const ERROR_CODE = /^E_[A-Z0-9_]{1,62}$/;

function fail(msg: string): never {
  throw new BlocksnapError('E_PROTOCOL', msg);
}

function id(v: string, path: string, required: boolean): void {
  if (required && v === '') fail(`${path} is empty`);
  if (v.length > MAX_ID) fail(`${path} is longer than ${MAX_ID} characters`);
  if (CONTROL_CHARS.test(v)) fail(`${path} contains control characters`);
}

function bytesIn(v: Uint8Array, min: number, max: number, path: string): void {
  if (v.length < min || v.length > max) fail(min === max ? `${path} must be ${min} bytes` : `${path} must be ${min}..${max} bytes`);
}

function text(v: string, path: string, max = MAX_TEXT): void {
  if (v.length > max) fail(`${path} is longer than ${max} characters`);
}

function errorCode(v: string, path: string): void {
  if (!ERROR_CODE.test(v)) fail(`${path} ${JSON.stringify(v.slice(0, 80))} is not an error code`);
}

function mode(v: number, path: string): void {
  if (v !== JobMode.FULL && v !== JobMode.INCREMENTAL) fail(`${path} ${v} is neither FULL nor INCREMENTAL`);
}

function chunkSize(v: number, path: string): void {
  assertChunkSize(v, 'E_PROTOCOL', path);
}

function stats(s: TransferStats | undefined, path: string): void {
  if (!s) return;
  for (const k of ['freezeSeconds', 'snapshotSeconds', 'readSeconds'] as const) {
    if (!Number.isFinite(s[k]) || s[k] < 0) fail(`${path}.${k} ${s[k]} is not a finite non-negative number`);
  }
  id(s.changeSource, `${path}.changeSource`, false);
  text(s.fallbackReason, `${path}.fallbackReason`);
}

function isZeroDigest(d: Uint8Array): boolean {
  return d.length === DIGEST_BYTES && d.every((b) => b === 0);
}

function chunks(list: Chunk[]): void {
  const badChunk = (i: number, msg: string): never => {
    throw new BlocksnapError('E_BAD_CHUNK', `chunkBatch.chunks[${i}] (index ${list[i]!.index}): ${msg}`);
  };
  if (list.length === 0) fail('chunkBatch has no chunks');
  list.forEach((c, i) => {
    if (i > 0 && c.index <= list[i - 1]!.index) badChunk(i, 'indexes are not strictly increasing');
    if (c.plainLength < 1 || c.plainLength > MAX_CHUNK) badChunk(i, `plainLength ${c.plainLength} out of 1..${MAX_CHUNK}`);
    if (c.zero) {
      // A zero chunk carries no data; its digest may be left empty or be ZERO.
      if (c.data.length !== 0) badChunk(i, 'zero chunk carries data');
      if (c.digest.length !== 0 && !isZeroDigest(c.digest)) badChunk(i, 'zero chunk with a non-ZERO digest');
    } else {
      if (c.digest.length !== DIGEST_BYTES) badChunk(i, `digest is ${c.digest.length} bytes, not ${DIGEST_BYTES}`);
      if (isZeroDigest(c.digest)) badChunk(i, 'ZERO digest on a chunk that is not zero');
      if (c.data.length === 0) badChunk(i, 'chunk without data');
    }
  });
}
