/**
 * Pack file layout (DESIGN.md §3.1). Frozen: changing a byte here breaks
 * every pack already written. All integers little-endian.
 *
 * ```
 * offset  size  field
 * 0       8     magic "BSNPACK\0"
 * 8       2     version = 1
 * 10      2     reserved = 0
 * 12      4     reserved = 0
 * 16      ...   blob payloads, back to back, no framing
 * T       56*N  trailer entries, one per blob, in write order:
 *                 0  32  digest (SHA-256 of the plain blob)
 *                32   8  offset of the payload in the file (u64)
 *                40   4  stored length (u32)
 *                44   4  plain length (u32)
 *                48   1  type: 1 = chunk, 2 = index page, 3 = index root
 *                49   1  codec: 0 = none, 1 = zstd
 *                50   6  reserved = 0
 * E       40    footer:
 *                 0   8  trailer offset T (u64)
 *                 8   4  entry count N (u32)
 *                12   2  version = 1
 *                14   2  reserved = 0
 *                16  16  first 16 bytes of SHA-256 over the trailer entries
 *                32   8  magic "BSNPEND\0"
 * ```
 *
 * Everything here is pure: decoders throw E_FORMAT and the reader, which
 * knows the pack's name, turns that into E_STORE_CORRUPT.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import type { BlobType } from './chunk-store.js';

export const PACK_MAGIC = Buffer.from('BSNPACK\0', 'latin1');
export const PACK_END_MAGIC = Buffer.from('BSNPEND\0', 'latin1');
export const PACK_VERSION = 1;
export const PACK_HEADER_SIZE = 16;
export const TRAILER_ENTRY_SIZE = 56;
export const FOOTER_SIZE = 40;
export const TRAILER_CHECKSUM_SIZE = 16;
export const CODEC_NONE = 0;
export const CODEC_ZSTD = 1;
export const MAX_STORED_LENGTH = 0xffff_ffff;

export type Codec = typeof CODEC_NONE | typeof CODEC_ZSTD;

export interface TrailerEntry {
  digest: Buffer;
  offset: number;
  storedLength: number;
  plainLength: number;
  type: BlobType;
  codec: Codec;
}

export interface PackFooter {
  trailerOffset: number;
  entryCount: number;
  trailerChecksum: Buffer;
}

/** Pack ids are the hex SHA-256 of the whole file; nothing else is accepted as a name. */
export const PACK_ID_RE = /^[0-9a-f]{64}$/;

export function packRelPath(id: string): string {
  if (!PACK_ID_RE.test(id)) throw new BlocksnapError('E_FORMAT', `invalid pack id ${JSON.stringify(id)}`);
  return join(id.slice(0, 2), `${id}.pack`);
}

function formatError(msg: string): BlocksnapError {
  return new BlocksnapError('E_FORMAT', msg);
}

export function encodeHeader(): Buffer {
  const b = Buffer.alloc(PACK_HEADER_SIZE);
  PACK_MAGIC.copy(b, 0);
  b.writeUInt16LE(PACK_VERSION, 8);
  return b;
}

export function decodeHeader(b: Buffer): void {
  if (b.length < PACK_HEADER_SIZE) throw formatError(`pack header: ${b.length} bytes`);
  if (!b.subarray(0, 8).equals(PACK_MAGIC)) throw formatError('pack header: bad magic');
  const version = b.readUInt16LE(8);
  if (version !== PACK_VERSION) throw formatError(`pack header: unsupported version ${version}`);
  if (b.readUInt16LE(10) !== 0 || b.readUInt32LE(12) !== 0) throw formatError('pack header: reserved bytes set');
}

export function encodeEntry(e: TrailerEntry, out: Buffer = Buffer.alloc(TRAILER_ENTRY_SIZE), at = 0): Buffer {
  if (e.digest.length !== 32) throw formatError(`trailer entry: digest is ${e.digest.length} bytes`);
  if (e.storedLength > MAX_STORED_LENGTH || e.plainLength > MAX_STORED_LENGTH) {
    throw formatError('trailer entry: length does not fit u32');
  }
  e.digest.copy(out, at);
  out.writeBigUInt64LE(BigInt(e.offset), at + 32);
  out.writeUInt32LE(e.storedLength, at + 40);
  out.writeUInt32LE(e.plainLength, at + 44);
  out.writeUInt8(e.type, at + 48);
  out.writeUInt8(e.codec, at + 49);
  out.fill(0, at + 50, at + TRAILER_ENTRY_SIZE);
  return out;
}

export function decodeEntry(b: Buffer, at = 0): TrailerEntry {
  if (b.length < at + TRAILER_ENTRY_SIZE) throw formatError('trailer entry: truncated');
  const type = b.readUInt8(at + 48);
  const codec = b.readUInt8(at + 49);
  if (type < 1 || type > 3) throw formatError(`trailer entry: unknown blob type ${type}`);
  if (codec !== CODEC_NONE && codec !== CODEC_ZSTD) throw formatError(`trailer entry: unknown codec ${codec}`);
  for (let i = at + 50; i < at + TRAILER_ENTRY_SIZE; i++) {
    if (b[i] !== 0) throw formatError('trailer entry: reserved bytes set');
  }
  const offset = b.readBigUInt64LE(at + 32);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) throw formatError('trailer entry: offset out of range');
  return {
    digest: Buffer.from(b.subarray(at, at + 32)),
    offset: Number(offset),
    storedLength: b.readUInt32LE(at + 40),
    plainLength: b.readUInt32LE(at + 44),
    type: type as BlobType,
    codec: codec as Codec,
  };
}

export function encodeTrailer(entries: readonly TrailerEntry[]): Buffer {
  const out = Buffer.alloc(entries.length * TRAILER_ENTRY_SIZE);
  entries.forEach((e, i) => encodeEntry(e, out, i * TRAILER_ENTRY_SIZE));
  return out;
}

export function decodeTrailer(b: Buffer, count: number): TrailerEntry[] {
  if (b.length !== count * TRAILER_ENTRY_SIZE) throw formatError(`trailer: ${b.length} bytes for ${count} entries`);
  const out: TrailerEntry[] = new Array(count);
  for (let i = 0; i < count; i++) out[i] = decodeEntry(b, i * TRAILER_ENTRY_SIZE);
  return out;
}

export function trailerChecksum(trailer: Buffer): Buffer {
  return createHash('sha256').update(trailer).digest().subarray(0, TRAILER_CHECKSUM_SIZE);
}

export function encodeFooter(f: PackFooter): Buffer {
  if (f.trailerChecksum.length !== TRAILER_CHECKSUM_SIZE) throw formatError('footer: checksum must be 16 bytes');
  const b = Buffer.alloc(FOOTER_SIZE);
  b.writeBigUInt64LE(BigInt(f.trailerOffset), 0);
  b.writeUInt32LE(f.entryCount, 8);
  b.writeUInt16LE(PACK_VERSION, 12);
  f.trailerChecksum.copy(b, 16);
  PACK_END_MAGIC.copy(b, 32);
  return b;
}

export function decodeFooter(b: Buffer): PackFooter {
  if (b.length !== FOOTER_SIZE) throw formatError(`footer: ${b.length} bytes`);
  if (!b.subarray(32, 40).equals(PACK_END_MAGIC)) throw formatError('footer: bad end magic');
  const version = b.readUInt16LE(12);
  if (version !== PACK_VERSION) throw formatError(`footer: unsupported version ${version}`);
  if (b.readUInt16LE(14) !== 0) throw formatError('footer: reserved bytes set');
  const t = b.readBigUInt64LE(0);
  if (t > BigInt(Number.MAX_SAFE_INTEGER)) throw formatError('footer: trailer offset out of range');
  return {
    trailerOffset: Number(t),
    entryCount: b.readUInt32LE(8),
    trailerChecksum: Buffer.from(b.subarray(16, 32)),
  };
}

/**
 * Checks a footer against the file it ends and the trailer it points at:
 * the trailer must sit exactly between the payloads and the footer, match its
 * checksum, and every entry must point inside the payload area.
 */
export function checkTrailer(footer: PackFooter, trailer: Buffer, fileSize: number): TrailerEntry[] {
  const expectEnd = footer.trailerOffset + footer.entryCount * TRAILER_ENTRY_SIZE;
  if (footer.trailerOffset < PACK_HEADER_SIZE || expectEnd + FOOTER_SIZE !== fileSize) {
    throw formatError(`footer: trailer at ${footer.trailerOffset} with ${footer.entryCount} entries does not fit a ${fileSize}-byte file`);
  }
  if (!trailerChecksum(trailer).equals(footer.trailerChecksum)) throw formatError('trailer checksum mismatch');
  const entries = decodeTrailer(trailer, footer.entryCount);
  for (const e of entries) {
    if (e.offset < PACK_HEADER_SIZE || e.offset + e.storedLength > footer.trailerOffset) {
      throw formatError(`trailer entry ${e.digest.toString('hex')} points outside the payload area`);
    }
    if (e.codec === CODEC_NONE && e.storedLength !== e.plainLength) {
      throw formatError(`trailer entry ${e.digest.toString('hex')}: uncompressed but lengths differ`);
    }
  }
  return entries;
}
