import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import { BlocksnapError } from './errors.js';
import type { blocksnap } from './generated/blocksnap.js';

/**
 * TypeScript view of proto/blocksnap.proto (DESIGN.md §4), plus the body-level
 * encode/decode the frame codec builds on.
 *
 * The types are derived, not hand-written: `npm run proto:gen` (pbjs + pbts)
 * writes the schema's raw interfaces to proto/generated/blocksnap.d.ts, and
 * `Decoded` below maps them to the shape `decodeEnvelopeBody` returns (see
 * converterFor), so a field added to the .proto appears here after
 * regenerating, with no hand edit. test/proto/generated-types.test.ts fails
 * when the generated file is stale; test/proto/message-types.test.ts pins the
 * mapping.
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

/** protobufjs's Long (64-bit integers in the raw interfaces), matched by shape. */
interface LongLike { low: number; high: number; unsigned: boolean; toNumber(): number }
/** The numeric value(s) of a number type: an enum becomes the union of its member values (JobMode → 0 | 1 | 2), `number` stays `number`. */
type NumberOf<V extends number> = `${V}` extends `${infer N extends number}` ? N : number;
/** A raw interface's field type as decoded: Long | number → number, bytes → Uint8Array (a Buffer at run time), a message → its Decoded shape. */
type DecodedValue<V> =
  V extends readonly (infer E)[] ? DecodedValue<NonNullable<E>>[]
  : V extends Uint8Array ? Uint8Array
  : V extends LongLike ? never
  : V extends number ? NumberOf<V>
  : V extends string | boolean ? V
  : V extends object ? Decoded<V>
  : V;
/** Schema fields of a raw interface (pbts adds `$unknowns`, never set by this codec). */
type SchemaKeys<P> = Exclude<keyof P, '$unknowns'>;
/** Non-repeated message fields: `undefined` when absent, hence optional. */
type MessageKeys<P> = { [K in SchemaKeys<P>]-?: IsMessage<NonNullable<P[K]>> extends true ? K : never }[SchemaKeys<P>];
type IsMessage<V> = [V] extends [readonly unknown[]] ? false : [V] extends [Uint8Array] ? false : [V] extends [LongLike] ? false : [V] extends [object] ? true : false;

/**
 * The decoded shape of a generated raw interface `P` (`blocksnap.v1.X.$Properties`):
 * every field required and non-null except message fields (undefined when
 * absent) and the `Optional` ones — fields a sender may omit although decoding
 * always fills them.
 */
export type Decoded<P, Optional extends SchemaKeys<P> = never> = {
  -readonly [K in SchemaKeys<P> as K extends Optional | MessageKeys<P> ? never : K]-?: DecodedValue<NonNullable<P[K]>>;
} & {
  -readonly [K in SchemaKeys<P> as K extends Optional | MessageKeys<P> ? K : never]?: DecodedValue<NonNullable<P[K]>>;
};

type EnvelopeProps = blocksnap.v1.Envelope.$Properties;
/** Envelope oneof member names (the generated interface also carries the oneof's virtual `msg`). */
export type EnvelopeKind = Exclude<SchemaKeys<EnvelopeProps>, 'msg'>;
/**
 * Fields optional by design, per envelope kind: decoding always fills them, a
 * sender may omit them. Hello.groups: always an array after decoding, omitted
 * when the agent has no groups. Committed.setId/images: group jobs only
 * ("" and [] otherwise). RunMount.verify: only `verify --restore` sets it.
 */
interface OptionalByDesign { hello: 'groups'; committed: 'setId' | 'images'; runMount: 'verify' }
type OptionalOf<K extends EnvelopeKind> = K extends keyof OptionalByDesign ? OptionalByDesign[K] : never;

/** Envelope oneof member name → message type. */
export type MessageMap = { [K in EnvelopeKind]: Decoded<NonNullable<EnvelopeProps[K]>, OptionalOf<K> & SchemaKeys<NonNullable<EnvelopeProps[K]>>> };

export type VolumeInfo = Decoded<blocksnap.v1.VolumeInfo.$Properties>;
/** A consistency group: members snapshotted at one instant, committed as one image set. */
export type GroupInfo = Decoded<blocksnap.v1.GroupInfo.$Properties>;
export type Hello = MessageMap['hello'];
export type AuthChallenge = MessageMap['authChallenge'];
export type AuthProof = MessageMap['authProof'];
/** `serverSignature` proves the appliance holds the agent's verifier; the agent checks it. */
export type Welcome = MessageMap['welcome'];
export type RunJob = MessageMap['runJob'];
export type CancelJob = MessageMap['cancelJob'];
export type BeginVolume = MessageMap['beginVolume'];
export type VolumeReady = MessageMap['volumeReady'];
export type Chunk = Decoded<blocksnap.v1.Chunk.$Properties>;
export type ChunkBatch = MessageMap['chunkBatch'];
export type Ack = MessageMap['ack'];
export type TransferStats = Decoded<blocksnap.v1.TransferStats.$Properties>;
export type EndVolume = MessageMap['endVolume'];
export type MemberImage = Decoded<blocksnap.v1.MemberImage.$Properties>;
export type Committed = MessageMap['committed'];
export type CommitSet = MessageMap['commitSet'];
export type JobProgress = MessageMap['jobProgress'];
export type JobResult = MessageMap['jobResult'];
/** The wire `Error` message (named so it does not shadow the global Error). */
export type ErrorMessage = MessageMap['error'];
export type Ping = MessageMap['ping'];
export type PgBackupInfo = MessageMap['pgBackupInfo'];
export type WalPiece = MessageMap['walPiece'];
/** Instant mount (DESIGN.md §4.5). */
export type MountRequest = MessageMap['mountRequest'];
export type MountGranted = MessageMap['mountGranted'];
export type MountExport = Decoded<blocksnap.v1.MountExport.$Properties>;
export type MountPgInfoMessage = Decoded<blocksnap.v1.MountPgInfo.$Properties>;
export type MountRelease = MessageMap['mountRelease'];
export type WalFetch = MessageMap['walFetch'];
export type RunMount = MessageMap['runMount'];
export type MountResult = MessageMap['mountResult'];
/** WAL travels cut at this size: offset a multiple of it, length min(it, fileSize − offset) (DESIGN.md §4.2). */
export const WAL_PIECE_BYTES = 4 << 20;

export type Envelope = { [K in EnvelopeKind]: { kind: K } & { [P in K]: MessageMap[K] } }[EnvelopeKind];
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
