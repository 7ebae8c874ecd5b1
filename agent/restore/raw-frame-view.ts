/**
 * The plain bytes of a zstd frame made only of raw (stored) blocks, as views
 * into the frame — no decompression, no copy. The appliance sends every chunk
 * its store keeps plain (incompressible data: all of it for random or
 * encrypted volumes) as such a frame (appliance/restore/zstd-raw-frame.ts);
 * running the decoder on it is a memcpy of every byte into a scratch buffer
 * the worker then hashes and writes. With the views the worker hashes and
 * writes (writev) straight from the received message.
 *
 * Anything else — compressed or RLE blocks, a checksum, a dictionary,
 * several frames, sizes that do not add up to `plainLength` — returns null
 * and the caller runs the real decoder, which keeps its bounds and its
 * errors. Accepting a frame here decides nothing about its content: the
 * caller hashes exactly the bytes it will write and compares them with the
 * image's digest.
 *
 * RFC 8878 §3.1.1: magic · frame header descriptor (FCS flag 7–6,
 * Single_Segment 5, reserved 3 = 0, checksum 2, dictionary ID 1–0) ·
 * [window descriptor unless single segment] · [dictionary ID] · [content
 * size: 1 byte if single segment and FCS flag 0, else 0/2/4/8 bytes] ·
 * blocks (3-byte header: last bit 0, type bits 1–2, size bits 3–23).
 */
const MAGIC = 0xfd2fb528;
const BLOCK_MAX = 128 * 1024;

export function rawFrameView(frame: Buffer, plainLength: number): Buffer[] | null {
  if (frame.length < 8 || frame.readUInt32LE(0) !== MAGIC) return null;
  const fhd = frame[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  if ((fhd & 0x08) !== 0 || (fhd & 0x04) !== 0 || (fhd & 0x03) !== 0) return null; // reserved, checksum, dictionary
  let p = 5;
  if (!single) p += 1;
  const fcsBytes = fcsFlag === 0 ? single : fcsFlag === 1 ? 2 : fcsFlag === 2 ? 4 : 8;
  if (p + fcsBytes > frame.length) return null;
  if (fcsBytes > 0) {
    let declared: number;
    if (fcsBytes === 1) declared = frame[p]!;
    else if (fcsBytes === 2) declared = frame.readUInt16LE(p) + 256;
    else if (fcsBytes === 4) declared = frame.readUInt32LE(p);
    else declared = Number(frame.readBigUInt64LE(p));
    if (declared !== plainLength) return null;
  }
  p += fcsBytes;
  const parts: Buffer[] = [];
  let total = 0;
  for (;;) {
    if (p + 3 > frame.length) return null;
    const h = frame[p]! | (frame[p + 1]! << 8) | (frame[p + 2]! << 16);
    const last = h & 1;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    p += 3;
    if (type !== 0 || size > BLOCK_MAX || p + size > frame.length) return null;
    if (size > 0) parts.push(frame.subarray(p, p + size));
    p += size;
    total += size;
    if (total > plainLength) return null;
    if (last) break;
  }
  if (p !== frame.length || total !== plainLength) return null;
  return parts;
}
