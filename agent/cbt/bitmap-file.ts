import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { BlocksnapError } from '../../proto/errors.js';
import { writeFileDurably } from '../../proto/shared/durable-file.js';
import { chunkCountOf, isValidTrackingGranularity } from '../../proto/shared/volume-geometry.js';
import { ChangeBitmap } from './change-bitmap.js';
import type { DeviceIdentity } from './tracker.js';

/**
 * Persistent change bitmap of one tracked device (the open generation).
 * All integers little-endian.
 *
 * offset size  field
 * 0      8     magic "BSNBMAP\0"
 * 8      2     version = 1
 * 10     2     flags: bit0 clean shutdown, bit1 tracking invalid (reason at 96),
 *              bit2 I/O counters valid
 * 12     4     chunk size (u32)
 * 16     4     device major (u32)
 * 20     4     device minor (u32)
 * 24     8     device size in bytes (u64)
 * 32     8     device diskseq (u64), 0 = unknown
 * 40     8     generation number of the bitmap (u64)
 * 48     8     chunk count N (u64) = ceil(size / chunk size)
 * 56     8     completed write I/Os when saved (u64)
 * 64     8     written sectors when saved (u64)
 * 72     8     completed discard I/Os when saved (u64)
 * 80     8     discarded sectors when saved (u64)
 * 88     8     saved at, ms since the Unix epoch (u64)
 * 96     128   invalid reason, UTF-8, NUL padded (cut at a character boundary)
 * 224    32    SHA-256 over bytes [0, 224) followed by the bitmap bytes
 * 256    4*W   bitmap, W = ceil(N / 32) u32 words; bit b of word w = chunk 32w+b
 *
 * The file is only ever replaced whole: temp file, fsync, rename, fsync of
 * the directory, so a reader sees the old or the new content, never a mix.
 */
export const BITMAP_MAGIC = Buffer.from('BSNBMAP\0', 'latin1');
export const BITMAP_VERSION = 1;
export const BITMAP_HEADER_SIZE = 256;
const REASON_OFFSET = 96;
const REASON_SIZE = 128;
const CHECKSUM_OFFSET = 224;

const FLAG_CLEAN = 1;
const FLAG_INVALID = 2;
const FLAG_COUNTERS = 4;

export interface SavedCounters {
  writeIos: number;
  writeSectors: number;
  discardIos: number;
  discardSectors: number;
}

export interface BitmapFileContent {
  identity: DeviceIdentity;
  chunkSize: number;
  generation: number;
  /** Written by a clean stop: every write up to `counters` is in the bitmap. */
  clean: boolean;
  /** Set when tracking had already failed when the file was saved. */
  invalidReason: string | null;
  /** null when the device does not account I/O. */
  counters: SavedCounters | null;
  savedAt: Date;
  bitmap: ChangeBitmap;
}

export function encodeBitmapFile(c: BitmapFileContent): Buffer {
  const { bitmap } = c;
  if (bitmap.deviceSize !== c.identity.size || bitmap.chunkSize !== c.chunkSize) {
    throw new BlocksnapError('E_FORMAT', 'bitmap shape does not match the identity it is saved with');
  }
  const body = bitmap.toBytes();
  const h = Buffer.alloc(BITMAP_HEADER_SIZE);
  BITMAP_MAGIC.copy(h, 0);
  h.writeUInt16LE(BITMAP_VERSION, 8);
  const flags =
    (c.clean ? FLAG_CLEAN : 0) | (c.invalidReason !== null ? FLAG_INVALID : 0) | (c.counters ? FLAG_COUNTERS : 0);
  h.writeUInt16LE(flags, 10);
  h.writeUInt32LE(c.chunkSize, 12);
  h.writeUInt32LE(c.identity.major, 16);
  h.writeUInt32LE(c.identity.minor, 20);
  h.writeBigUInt64LE(BigInt(c.identity.size), 24);
  h.writeBigUInt64LE(BigInt(c.identity.diskseq), 32);
  h.writeBigUInt64LE(BigInt(c.generation), 40);
  h.writeBigUInt64LE(BigInt(bitmap.chunkCount), 48);
  const k = c.counters ?? { writeIos: 0, writeSectors: 0, discardIos: 0, discardSectors: 0 };
  h.writeBigUInt64LE(BigInt(k.writeIos), 56);
  h.writeBigUInt64LE(BigInt(k.writeSectors), 64);
  h.writeBigUInt64LE(BigInt(k.discardIos), 72);
  h.writeBigUInt64LE(BigInt(k.discardSectors), 80);
  h.writeBigUInt64LE(BigInt(c.savedAt.getTime()), 88);
  if (c.invalidReason !== null) h.write(c.invalidReason, REASON_OFFSET, REASON_SIZE, 'utf8');
  checksum(h, body).copy(h, CHECKSUM_OFFSET);
  return Buffer.concat([h, body]);
}

/** Throws E_FORMAT with the precise reason a file is not usable. */
export function decodeBitmapFile(buf: Buffer): BitmapFileContent {
  if (buf.length < BITMAP_HEADER_SIZE) throw fmt(`file is ${buf.length} bytes, shorter than the header`);
  if (!buf.subarray(0, 8).equals(BITMAP_MAGIC)) throw fmt('bad magic');
  const version = buf.readUInt16LE(8);
  if (version !== BITMAP_VERSION) throw fmt(`unsupported version ${version}`);
  const size = u64(buf, 24);
  const chunkSize = buf.readUInt32LE(12);
  const chunkCount = u64(buf, 48);
  if (!isValidTrackingGranularity(chunkSize) || size <= 0 || chunkCount !== chunkCountOf(size, chunkSize)) {
    throw fmt(`inconsistent geometry: size ${size}, chunk size ${chunkSize}, chunk count ${chunkCount}`);
  }
  const body = buf.subarray(BITMAP_HEADER_SIZE);
  if (body.length !== ChangeBitmap.wordCount(chunkCount) * 4) {
    throw fmt(`bitmap is ${body.length} bytes, expected ${ChangeBitmap.wordCount(chunkCount) * 4}`);
  }
  const header = Buffer.from(buf.subarray(0, BITMAP_HEADER_SIZE));
  const stored = Buffer.from(header.subarray(CHECKSUM_OFFSET, CHECKSUM_OFFSET + 32));
  if (!checksum(header, body).equals(stored)) throw fmt('checksum mismatch');
  const flags = buf.readUInt16LE(10);
  const reasonBytes = buf.subarray(REASON_OFFSET, REASON_OFFSET + REASON_SIZE);
  const nul = reasonBytes.indexOf(0);
  return {
    identity: { major: buf.readUInt32LE(16), minor: buf.readUInt32LE(20), size, diskseq: u64(buf, 32) },
    chunkSize,
    generation: u64(buf, 40),
    clean: (flags & FLAG_CLEAN) !== 0,
    invalidReason: flags & FLAG_INVALID ? reasonBytes.toString('utf8', 0, nul < 0 ? REASON_SIZE : nul) : null,
    counters:
      flags & FLAG_COUNTERS
        ? { writeIos: u64(buf, 56), writeSectors: u64(buf, 64), discardIos: u64(buf, 72), discardSectors: u64(buf, 80) }
        : null,
    savedAt: new Date(u64(buf, 88)),
    bitmap: ChangeBitmap.fromBytes(body, size, chunkSize),
  };
}

/** Durable replace (proto/shared/durable-file). */
export async function writeBitmapFile(file: string, c: BitmapFileContent): Promise<void> {
  try {
    await writeFileDurably(file, encodeBitmapFile(c));
  } catch (e) {
    throw new BlocksnapError('E_TRACKER', `cannot save bitmap ${file}: ${(e as Error).message}`, { cause: e });
  }
}

/** null when the file does not exist; E_FORMAT when it exists but is unusable. */
export async function readBitmapFile(file: string): Promise<BitmapFileContent | null> {
  let buf: Buffer;
  try {
    buf = await fsp.readFile(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new BlocksnapError('E_TRACKER', `cannot read bitmap ${file}: ${(e as Error).message}`, { cause: e });
  }
  return decodeBitmapFile(buf);
}

function checksum(header: Buffer, body: Buffer): Buffer {
  const h = createHash('sha256');
  h.update(header.subarray(0, CHECKSUM_OFFSET));
  h.update(body);
  return h.digest();
}

function u64(buf: Buffer, off: number): number {
  const v = buf.readBigUInt64LE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw fmt(`field at ${off} is out of range`);
  return Number(v);
}

function fmt(msg: string): BlocksnapError {
  return new BlocksnapError('E_FORMAT', `bitmap file: ${msg}`);
}
