/**
 * Image index root (DESIGN.md §3.3): a blob of type 3 listing the digests of
 * an image's pages. Pure encode/decode; the store holds the bytes.
 *
 * ```
 * 0   8   magic "BSNROOT\0"
 * 8   2   version = 1
 * 10  2   reserved = 0
 * 12  4   chunk size (u32)
 * 16  8   volume size in bytes (u64)
 * 24  8   chunk count (u64) = ceil(volume size / chunk size)
 * 32  4   slots per page = 1024 (u32)
 * 36  4   page count P (u32) = ceil(chunk count / 1024)
 * 40  32*P page digests (ZERO for a page whose slots are all ZERO)
 * ```
 *
 * A page is a blob of type 2: 1024 slots × 32-byte digest, slot s of page p
 * holding the digest of chunk p*1024+s; slots past the volume end are ZERO.
 *
 * This module lives in proto/shared because both sides compute the root: the
 * appliance builds it page by page while it stores an image, the agent
 * computes it from its full digest map and sends it with EndVolume, and the
 * appliance commits only if the two are equal (DESIGN.md §4.2, "proven
 * commits"). One encoder serves both, so they cannot drift apart.
 */
import { createHash } from 'node:crypto';
import { BlocksnapError } from '../errors.js';
import { assertChunkSize, chunkCountOf } from './volume-geometry.js';

export const ROOT_MAGIC: Buffer = Buffer.from('BSNROOT\0', 'latin1');
export const ROOT_VERSION = 1;
export const ROOT_HEADER_BYTES = 40;
export const DIGEST_BYTES = 32;
export const SLOTS_PER_PAGE = 1024;
export const PAGE_BYTES = SLOTS_PER_PAGE * DIGEST_BYTES;

export interface ImageGeometry {
  volumeSize: number;
  chunkSize: number;
  chunkCount: number;
  pageCount: number;
}

export interface ImageRoot extends ImageGeometry {
  /** P × 32 bytes, page p's digest at p*32. */
  pages: Buffer;
}

function formatError(message: string): BlocksnapError {
  return new BlocksnapError('E_FORMAT', `image root: ${message}`);
}

/**
 * Chunk and page counts of a volume. Sizes stay JS numbers: 2^53 bytes is far
 * beyond any volume, and refusing unsafe integers keeps arithmetic exact.
 */
export function imageGeometry(volumeSize: number, chunkSize: number): ImageGeometry {
  assertChunkSize(chunkSize, 'E_FORMAT', 'image root: chunk size');
  if (!Number.isSafeInteger(volumeSize) || volumeSize <= 0) {
    throw formatError(`volume size ${volumeSize} is not a positive safe integer`);
  }
  const chunkCount = chunkCountOf(volumeSize, chunkSize);
  const pageCount = Math.ceil(chunkCount / SLOTS_PER_PAGE);
  if (pageCount > 0xffffffff) throw formatError(`page count ${pageCount} exceeds u32`);
  return { volumeSize, chunkSize, chunkCount, pageCount };
}

export function encodeRoot(root: ImageRoot): Buffer {
  const g = imageGeometry(root.volumeSize, root.chunkSize);
  if (root.chunkCount !== g.chunkCount || root.pageCount !== g.pageCount) {
    throw formatError('chunk/page count does not match the volume geometry');
  }
  if (root.pages.length !== g.pageCount * DIGEST_BYTES) {
    throw formatError(`page list is ${root.pages.length} bytes, expected ${g.pageCount * DIGEST_BYTES}`);
  }
  const out = Buffer.alloc(ROOT_HEADER_BYTES + root.pages.length);
  ROOT_MAGIC.copy(out, 0);
  out.writeUInt16LE(ROOT_VERSION, 8);
  out.writeUInt16LE(0, 10);
  out.writeUInt32LE(g.chunkSize, 12);
  out.writeBigUInt64LE(BigInt(g.volumeSize), 16);
  out.writeBigUInt64LE(BigInt(g.chunkCount), 24);
  out.writeUInt32LE(SLOTS_PER_PAGE, 32);
  out.writeUInt32LE(g.pageCount, 36);
  root.pages.copy(out, ROOT_HEADER_BYTES);
  return out;
}

function readSafeU64(buf: Buffer, offset: number, what: string): number {
  const v = buf.readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw formatError(`${what} ${v} is out of range`);
  return Number(v);
}

/** Decode and check every header field; `pages` is a copy, not a view of `buf`. */
export function decodeRoot(buf: Buffer): ImageRoot {
  if (buf.length < ROOT_HEADER_BYTES) throw formatError(`${buf.length} bytes is shorter than the header`);
  if (!buf.subarray(0, 8).equals(ROOT_MAGIC)) throw formatError('bad magic');
  const version = buf.readUInt16LE(8);
  if (version !== ROOT_VERSION) throw formatError(`unsupported version ${version}`);
  if (buf.readUInt16LE(10) !== 0) throw formatError('reserved field is not zero');
  const chunkSize = buf.readUInt32LE(12);
  const volumeSize = readSafeU64(buf, 16, 'volume size');
  const chunkCount = readSafeU64(buf, 24, 'chunk count');
  const slots = buf.readUInt32LE(32);
  const pageCount = buf.readUInt32LE(36);
  if (slots !== SLOTS_PER_PAGE) throw formatError(`slots per page ${slots} != ${SLOTS_PER_PAGE}`);
  const g = imageGeometry(volumeSize, chunkSize);
  if (chunkCount !== g.chunkCount) throw formatError(`chunk count ${chunkCount} != ${g.chunkCount}`);
  if (pageCount !== g.pageCount) throw formatError(`page count ${pageCount} != ${g.pageCount}`);
  const expected = ROOT_HEADER_BYTES + pageCount * DIGEST_BYTES;
  if (buf.length !== expected) throw formatError(`length ${buf.length} != ${expected}`);
  return { ...g, pages: Buffer.from(buf.subarray(ROOT_HEADER_BYTES)) };
}

/** View of page p's digest inside `root.pages` (do not mutate). */
export function rootPageDigest(root: ImageRoot, p: number): Buffer {
  if (!Number.isInteger(p) || p < 0 || p >= root.pageCount) {
    throw new BlocksnapError('E_CHUNK_RANGE', `page ${p} outside 0..${root.pageCount - 1}`);
  }
  return root.pages.subarray(p * DIGEST_BYTES, (p + 1) * DIGEST_BYTES);
}

/**
 * SHA-256 of the root of the image whose chunk digests are `digests`
 * (chunkCount × 32 bytes, ZERO for all-zero chunks): the digest the store
 * addresses the root blob by. A page whose slots are all ZERO is ZERO, as in
 * the store. Cost: one SHA-256 per non-zero page (16 K pages for 1 TiB at
 * 64 KiB chunks, 512 MiB hashed).
 */
export function imageRootDigest(volumeSize: number, chunkSize: number, digests: Uint8Array): Buffer {
  const g = imageGeometry(volumeSize, chunkSize);
  if (digests.length !== g.chunkCount * DIGEST_BYTES) {
    throw new BlocksnapError('E_PROTOCOL', `digest map is ${digests.length} bytes, expected ${g.chunkCount * DIGEST_BYTES}`);
  }
  const all = Buffer.from(digests.buffer, digests.byteOffset, digests.byteLength);
  const pages = Buffer.alloc(g.pageCount * DIGEST_BYTES);
  const page = Buffer.alloc(PAGE_BYTES);
  for (let p = 0; p < g.pageCount; p++) {
    const from = p * PAGE_BYTES;
    const slots = all.subarray(from, Math.min(all.length, from + PAGE_BYTES));
    // A short last page is ZERO past the volume end (the store pads it the same way).
    if (isAllZero(slots)) continue;
    let content: Buffer = slots;
    if (slots.length < PAGE_BYTES) {
      page.fill(0);
      slots.copy(page);
      content = page;
    }
    createHash('sha256').update(content).digest().copy(pages, p * DIGEST_BYTES);
  }
  const root = encodeRoot({ ...g, pages });
  return createHash('sha256').update(root).digest();
}

const ZERO_PAGE_BYTES = Buffer.alloc(PAGE_BYTES);

function isAllZero(b: Buffer): boolean {
  return b.equals(ZERO_PAGE_BYTES.subarray(0, b.length));
}
