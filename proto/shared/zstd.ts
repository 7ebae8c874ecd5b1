/**
 * zstd for the store and the ingest, always with a known plain length.
 *
 * Decompression never produces more than the length the caller expects: a
 * frame that declares a larger content size is refused before any allocation,
 * and the single-shot decoder is given an output buffer of exactly the
 * expected size, so a frame without a declared size (or lying about it) fails
 * with "destination too small" instead of growing memory. This is what keeps a
 * hostile agent from sending a zstd bomb.
 */
import binding from 'zstd-napi/binding.js';
import { BlocksnapError } from '../errors.js';

export const DEFAULT_ZSTD_LEVEL = 1;

const cctx = new binding.CCtx();
const dctx = new binding.DCtx();
let scratch = Buffer.alloc(0);

/** Compress into a new exact-size buffer (one zstd frame with its content size). */
export function zstdCompress(plain: Uint8Array, level = DEFAULT_ZSTD_LEVEL): Buffer {
  const bound = binding.compressBound(plain.length);
  if (scratch.length < bound) scratch = Buffer.allocUnsafe(Math.max(bound, 64 * 1024));
  let n: number;
  try {
    n = cctx.compress(scratch, plain, level);
  } catch (e) {
    throw new BlocksnapError('E_INTERNAL', `zstd compress failed: ${(e as Error).message}`, { cause: e });
  }
  return Buffer.from(scratch.subarray(0, n));
}

/**
 * Sum of the content sizes the frames declare, or null if one does not
 * declare it. Throws E_FORMAT when the input is not a sequence of frames.
 */
export function zstdDeclaredSize(frames: Uint8Array): number | null {
  let total = 0;
  let rest = frames;
  while (rest.length > 0) {
    let size: number | null;
    let frameLen: number;
    try {
      size = binding.getFrameContentSize(rest);
      frameLen = binding.findFrameCompressedSize(rest);
    } catch (e) {
      throw new BlocksnapError('E_FORMAT', `not a zstd frame: ${(e as Error).message}`, { cause: e });
    }
    if (size === null) return null;
    total += size;
    rest = rest.subarray(frameLen);
  }
  return total;
}

/**
 * Decompress `frames`, which must hold exactly `plainLength` plain bytes.
 * With `scratch`, the result is a view into it, valid until its next use.
 * Throws E_FORMAT (with the zstd message as cause) for anything else; callers
 * re-raise it as E_BAD_CHUNK (ingest) or E_STORE_CORRUPT (store).
 */
export function zstdDecompress(frames: Uint8Array, plainLength: number, scratch?: Buffer): Buffer {
  if (!Number.isSafeInteger(plainLength) || plainLength < 0 || plainLength > 0xffff_ffff) {
    throw new BlocksnapError('E_FORMAT', `invalid expected plain length ${plainLength}`);
  }
  const declared = zstdDeclaredSize(frames);
  if (declared !== null && declared !== plainLength) {
    throw new BlocksnapError('E_FORMAT', `zstd frame declares ${declared} bytes, expected ${plainLength}`);
  }
  // One spare byte: if the decoder fills it, the data is longer than declared.
  // A caller on the hot path passes a scratch buffer (≥ plainLength + 1) it
  // reuses, so a backup does not allocate (and garbage-collect) every chunk.
  const out = scratch && scratch.length >= plainLength + 1 ? scratch.subarray(0, plainLength + 1) : Buffer.allocUnsafe(plainLength + 1);
  let n: number;
  try {
    n = dctx.decompress(out, frames);
  } catch (e) {
    throw new BlocksnapError('E_FORMAT', `zstd decompress refused (limit ${plainLength} bytes): ${(e as Error).message}`, {
      cause: e,
    });
  }
  if (n !== plainLength) {
    throw new BlocksnapError('E_FORMAT', `zstd data holds ${n === plainLength + 1 ? 'more than ' : ''}${n} bytes, expected ${plainLength}`);
  }
  return out.subarray(0, plainLength);
}
