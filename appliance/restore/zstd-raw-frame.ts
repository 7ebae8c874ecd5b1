/**
 * A zstd frame holding `plain` as raw (stored, uncompressed) blocks, built
 * without running the compressor. The restore protocol carries every chunk
 * as a zstd frame (proto Chunk.data); a chunk the store keeps plain (it did
 * not compress) used to be compressed again on the appliance's one thread
 * for every restore — ≈ 40–90 µs of CPU per incompressible 64 KiB chunk
 * measured here, against ≈ 6–13 µs for this copy. The agent decompresses
 * (a copy for raw blocks) and checks the SHA-256 as for any frame.
 *
 * Layout (RFC 8878 §3.1.1): magic 0xFD2FB528 · frame header descriptor 0xA0
 * (Single_Segment, 4-byte Frame_Content_Size, no checksum, no dictionary) ·
 * content size (u32 LE) · blocks: 3-byte header (Last_Block bit 0,
 * Block_Type 0 = Raw in bits 1–2, Block_Size in bits 3–23) + the bytes, each
 * ≤ 128 KiB (Block_Maximum_Size; with Single_Segment the window is the
 * content size, so smaller content fits in one block).
 */
const MAGIC = 0xfd2fb528;
const BLOCK_MAX = 128 * 1024;
const HEADER = 9;

export function zstdRawFrame(plain: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(zstdRawFrameLength(plain.length));
  let p = 0;
  for (const slot of zstdRawFrameSlots(out, 0, plain.length)) {
    slot.set(plain.subarray(p, p + slot.length));
    p += slot.length;
  }
  return out;
}

/** Length of the raw frame of `plainLength` bytes. */
export function zstdRawFrameLength(plainLength: number): number {
  return HEADER + 3 * Math.max(1, Math.ceil(plainLength / BLOCK_MAX)) + plainLength;
}

/**
 * Writes the frame header and block headers of a raw frame of `plainLength`
 * bytes into `out` at `pos` (zstdRawFrameLength bytes) and returns the views
 * of `out` the plain bytes go to, in order — so a reader can put them there
 * itself (the restore server reads a pack's bytes straight into them).
 */
export function zstdRawFrameSlots(out: Buffer, pos: number, plainLength: number): Buffer[] {
  if (plainLength > 0xffff_ffff) throw new RangeError(`zstdRawFrame: ${plainLength} bytes do not fit a 4-byte content size`);
  const blocks = Math.max(1, Math.ceil(plainLength / BLOCK_MAX));
  out.writeUInt32LE(MAGIC, pos);
  out[pos + 4] = 0xa0;
  out.writeUInt32LE(plainLength, pos + 5);
  const slots: Buffer[] = [];
  let o = pos + HEADER;
  for (let k = 0, p = 0; k < blocks; k++) {
    const n = Math.min(BLOCK_MAX, plainLength - p);
    const h = n * 8 + (k === blocks - 1 ? 1 : 0);
    out[o] = h & 0xff;
    out[o + 1] = (h >>> 8) & 0xff;
    out[o + 2] = (h >>> 16) & 0xff;
    slots.push(out.subarray(o + 3, o + 3 + n));
    o += 3 + n;
    p += n;
  }
  return slots;
}
