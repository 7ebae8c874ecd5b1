import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import { BlocksnapError } from './errors.js';

/**
 * TypeScript view of proto/blocksnap.proto (DESIGN.md §4), plus the body-level
 * encode/decode the frame codec builds on.
 *
 * Shapes: field names are protobufjs camelCase; every scalar field is always
 * present after decoding (proto3 default when absent); a nested message field
 * (`stats`) is `undefined` when absent; repeated fields are arrays. 64-bit
 * integers are JS numbers: a received value above Number.MAX_SAFE_INTEGER is
 * E_FRAME_MALFORMED. Decoded `bytes` fields are Buffers that alias the frame
 * they came from (no copy): treat them as read-only.
 *
 * `Envelope` is a discriminated union on `kind`, whose value is also the name
 * of the property holding the message, so `switch (env.kind)` narrows:
 *   case 'ack': env.ack.durableNext
 */

/** Protocol version in Hello. 2: SCRAM challenge–response (1 sent a bearer token). */
export const PROTOCOL_VERSION = 2;

export const JobMode = { UNSPECIFIED: 0, FULL: 1, INCREMENTAL: 2 } as const;
export type JobMode = (typeof JobMode)[keyof typeof JobMode];

export interface VolumeInfo { name: string; size: number; chunkSize: number; lastImageId: string }
/** A consistency group: members snapshotted at one instant, committed as one image set. */
export interface GroupInfo { name: string; volumes: string[] }
export interface Hello {
  agent: string; protocolVersion: number; agentVersion: string; volumes: VolumeInfo[];
  /** Random per agent process; a new value means the agent restarted and its old jobs are gone. */
  instanceId: string;
  /** Always an array after decoding; a sender may omit it (no groups). */
  groups?: GroupInfo[];
  /** Fresh random bytes per connection (SCRAM, proto/scram.ts). */
  clientNonce: Uint8Array;
}
export interface AuthChallenge { salt: Uint8Array; iterations: number; serverNonce: Uint8Array }
export interface AuthProof { clientProof: Uint8Array }
/** `serverSignature` proves the appliance holds the agent's verifier; the agent checks it. */
export interface Welcome { sessionId: string; maxFrameBytes: number; windowBytes: number; serverSignature: Uint8Array }
export interface RunJob { jobId: string; volume: string; mode: JobMode; audit: boolean }
export interface CancelJob { jobId: string; reason: string }
export interface BeginVolume {
  jobId: string; volume: string; volumeSize: number; chunkSize: number;
  basisImageId: string; mode: JobMode; resume: boolean;
}
export interface VolumeReady { jobId: string; basisAccepted: boolean; resumeFrom: number; reason: string }
export interface Chunk { index: number; digest: Uint8Array; zero: boolean; data: Uint8Array; plainLength: number }
export interface ChunkBatch { jobId: string; seq: number; chunks: Chunk[] }
export interface Ack { jobId: string; seq: number; durableNext: number }
export interface TransferStats {
  chunksTotal: number; chunksRead: number; chunksSent: number; chunksZero: number;
  bytesRead: number; bytesSent: number; bytesStored: number; chunksStored: number;
  freezeSeconds: number; snapshotSeconds: number; readSeconds: number;
  changeSource: string; fallbackReason: string;
  trackedChunks: number; audited: boolean; auditChanged: number; auditMissed: number; auditExtra: number;
}
export interface EndVolume {
  jobId: string; nextIndex: number; stats?: TransferStats;
  /** SHA-256 of the image root the agent expects (32 bytes): the appliance commits only if its own root is equal. */
  expectedRoot: Uint8Array;
}
export interface MemberImage { volume: string; imageId: string }
export interface Committed {
  jobId: string; imageId: string; stats?: TransferStats;
  /** Group jobs only: the image set and every member's image. Always present after decoding ("" and []); a sender may omit them. */
  setId?: string; images?: MemberImage[];
}
export interface CommitSet { jobId: string }
export interface JobProgress { jobId: string; chunksDone: number; chunksTotal: number; bytesSent: number; phase: string }
export interface JobResult {
  jobId: string; ok: boolean; imageId: string; errorCode: string; errorMessage: string; stats?: TransferStats;
}
/** The wire `Error` message (named so it does not shadow the global Error). */
export interface ErrorMessage { jobId: string; code: string; message: string }
export interface Ping { nonce: number }
export interface PgBackupInfo {
  jobId: string; labelFile: string; spcmapFile: string; startLsn: string; stopLsn: string; timeline: number;
  replayLsn: string; exclusive: boolean; serverVersion: number; role: string; pausedSeconds: number;
  backupSeconds: number; walSegmentSize: number;
}
export interface WalPiece {
  jobId: string; fileName: string; offset: number; data: Uint8Array; plainLength: number; digest: Uint8Array; fileSize: number;
}
/** WAL travels cut at this size: offset a multiple of it, length min(it, fileSize − offset) (DESIGN.md §4.2). */
export const WAL_PIECE_BYTES = 4 << 20;

/** Envelope oneof member name → message type. */
export interface MessageMap {
  hello: Hello; welcome: Welcome; runJob: RunJob; cancelJob: CancelJob;
  beginVolume: BeginVolume; volumeReady: VolumeReady; chunkBatch: ChunkBatch; ack: Ack;
  endVolume: EndVolume; committed: Committed; jobProgress: JobProgress; jobResult: JobResult;
  error: ErrorMessage; ping: Ping; pong: Ping; pgBackupInfo: PgBackupInfo; walPiece: WalPiece; commitSet: CommitSet;
  authChallenge: AuthChallenge; authProof: AuthProof;
}
export type EnvelopeKind = keyof MessageMap;
export type Envelope =
  | { kind: 'hello'; hello: Hello }
  | { kind: 'welcome'; welcome: Welcome }
  | { kind: 'runJob'; runJob: RunJob }
  | { kind: 'cancelJob'; cancelJob: CancelJob }
  | { kind: 'beginVolume'; beginVolume: BeginVolume }
  | { kind: 'volumeReady'; volumeReady: VolumeReady }
  | { kind: 'chunkBatch'; chunkBatch: ChunkBatch }
  | { kind: 'ack'; ack: Ack }
  | { kind: 'endVolume'; endVolume: EndVolume }
  | { kind: 'committed'; committed: Committed }
  | { kind: 'jobProgress'; jobProgress: JobProgress }
  | { kind: 'jobResult'; jobResult: JobResult }
  | { kind: 'error'; error: ErrorMessage }
  | { kind: 'ping'; ping: Ping }
  | { kind: 'pong'; pong: Ping }
  | { kind: 'pgBackupInfo'; pgBackupInfo: PgBackupInfo }
  | { kind: 'walPiece'; walPiece: WalPiece }
  | { kind: 'commitSet'; commitSet: CommitSet }
  | { kind: 'authChallenge'; authChallenge: AuthChallenge }
  | { kind: 'authProof'; authProof: AuthProof };
export type EnvelopeOf<K extends EnvelopeKind> = Extract<Envelope, { kind: K }>;

/** Builds an envelope without repeating the kind: `envelope('ack', {...})`. */
export function envelope<K extends EnvelopeKind>(kind: K, msg: MessageMap[K]): EnvelopeOf<K> {
  return { kind, [kind]: msg } as unknown as EnvelopeOf<K>;
}

/** The message an envelope carries, whatever its kind. */
export function messageOf(env: Envelope): MessageMap[EnvelopeKind] {
  return (env as unknown as Record<string, MessageMap[EnvelopeKind]>)[env.kind];
}

export function emptyTransferStats(): TransferStats {
  return {
    chunksTotal: 0, chunksRead: 0, chunksSent: 0, chunksZero: 0, bytesRead: 0, bytesSent: 0,
    bytesStored: 0, chunksStored: 0, freezeSeconds: 0, snapshotSeconds: 0, readSeconds: 0,
    changeSource: '', fallbackReason: '',
    trackedChunks: 0, audited: false, auditChanged: 0, auditMissed: 0, auditExtra: 0,
  };
}

// The build copies the .proto next to the compiled module, so this relative
// path works from both the sources and dist/.
export const protoRoot = protobuf.loadSync(fileURLToPath(new URL('./blocksnap.proto', import.meta.url)));
export const EnvelopeType = protoRoot.lookupType('blocksnap.v1.Envelope');
const oneof = EnvelopeType.oneofs['msg'];
if (!oneof) throw new BlocksnapError('E_INTERNAL', 'blocksnap.proto: Envelope has no oneof msg');
/** Every envelope kind, in field-number order. */
export const ENVELOPE_KINDS = oneof.oneof as EnvelopeKind[];
const kindSet = new Set<string>(ENVELOPE_KINDS);

/** Appends the protobuf Envelope bytes to `writer` (no length prefix). */
export function writeEnvelopeBody(env: Envelope, writer: protobuf.Writer): void {
  if (!env || !kindSet.has(env.kind)) {
    throw new BlocksnapError('E_INTERNAL', `cannot encode envelope of unknown kind ${String(env?.kind)}`);
  }
  const msg = messageOf(env);
  if (msg === null || typeof msg !== 'object') {
    throw new BlocksnapError('E_INTERNAL', `envelope of kind ${env.kind} has no message object`);
  }
  EnvelopeType.encode({ [env.kind]: msg }, writer);
}

/** Decodes protobuf Envelope bytes; throws E_FRAME_MALFORMED. `body` is aliased, not copied. */
export function decodeEnvelopeBody(body: Buffer): Envelope {
  let decoded: protobuf.Message & Record<string, unknown>;
  try {
    decoded = EnvelopeType.decode(body) as protobuf.Message & Record<string, unknown>;
  } catch (e) {
    throw new BlocksnapError('E_FRAME_MALFORMED', `malformed envelope: ${(e as Error).message}`, { cause: e });
  }
  const kind = decoded['msg'];
  if (typeof kind !== 'string' || !kindSet.has(kind)) {
    throw new BlocksnapError('E_FRAME_MALFORMED', 'envelope has no message set');
  }
  const convert = converterFor(EnvelopeType.fields[kind]!.resolvedType as protobuf.Type);
  return { kind, [kind]: convert(decoded[kind], kind) } as unknown as Envelope;
}

type Convert = (v: unknown, path: string) => unknown;
const converters = new Map<protobuf.Type, Convert>();
const LONG_TYPES = new Set(['int64', 'uint64', 'sint64', 'fixed64', 'sfixed64']);

function toSafeNumber(v: unknown, path: string): number {
  const n = typeof v === 'number' ? v : (v as { toNumber(): number }).toNumber();
  if (!Number.isSafeInteger(n)) {
    throw new BlocksnapError('E_FRAME_MALFORMED', `${path} = ${String(v)} is beyond Number.MAX_SAFE_INTEGER`);
  }
  return n;
}

/** Builds (once per type) a plain-object converter with proto3 defaults filled in. */
function converterFor(type: protobuf.Type): Convert {
  const known = converters.get(type);
  if (known) return known;
  const fields = type.fieldsArray.map((f) => {
    f.resolve();
    let conv: Convert | null = null;
    let dflt: () => unknown;
    if (f.resolvedType instanceof protobuf.Type) {
      const sub = f.resolvedType;
      conv = (v, p) => converterFor(sub)(v, p);
      dflt = () => undefined;
    } else if (LONG_TYPES.has(f.type)) {
      conv = toSafeNumber;
      dflt = () => 0;
    } else if (f.type === 'bytes') {
      conv = (v) => (Buffer.isBuffer(v) ? v : Buffer.from(v as Uint8Array));
      dflt = () => Buffer.alloc(0);
    } else {
      const d = f.resolvedType instanceof protobuf.Enum ? 0 : (protobuf.types.defaults as Record<string, unknown>)[f.type];
      dflt = () => d;
    }
    return { name: f.name, repeated: f.repeated, conv, dflt };
  });
  const convert: Convert = (v, path) => {
    const src = v as Record<string, unknown>;
    const out: Record<string, unknown> = {};
    for (const f of fields) {
      const raw = src[f.name];
      const p = `${path}.${f.name}`;
      if (f.repeated) {
        const arr = Array.isArray(raw) ? raw : [];
        out[f.name] = f.conv ? arr.map((x, i) => f.conv!(x, `${p}[${i}]`)) : arr.slice();
      } else if (raw === null || raw === undefined) {
        out[f.name] = f.dflt();
      } else {
        out[f.name] = f.conv ? f.conv(raw, p) : raw;
      }
    }
    return out;
  };
  converters.set(type, convert);
  return convert;
}
