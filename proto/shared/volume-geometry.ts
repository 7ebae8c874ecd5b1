/**
 * Volume geometry, the one rule both sides hold a volume to (DESIGN.md §3):
 * a chunk size is a power of two in 4 KiB..4 MiB, a volume of S bytes has
 * ceil(S / chunk size) chunks and only the last one may be short.
 *
 * Each caller keeps its own error code, so this module takes it as an
 * argument: E_PROTOCOL for what came over the wire, E_FORMAT for a file,
 * E_USAGE for a bad call, E_CONFIG for the agent's configuration.
 *
 * The change tracker's granularity is a different rule on purpose (see
 * isValidTrackingGranularity): it counts in sectors, not in chunks sent.
 */
import { BlocksnapError, type ErrorCode } from '../errors.js';

export const MIN_CHUNK_SIZE = 4096;
export const MAX_CHUNK_SIZE = 4 * 1024 * 1024;
/** The smallest unit a block device writes; the tracker's bitmap granularity is never finer. */
export const SECTOR_SIZE = 512;

export interface VolumeGeometry {
  volumeSize: number;
  chunkSize: number;
}

export function isValidChunkSize(chunkSize: number): boolean {
  return (
    Number.isInteger(chunkSize) &&
    chunkSize >= MIN_CHUNK_SIZE &&
    chunkSize <= MAX_CHUNK_SIZE &&
    (chunkSize & (chunkSize - 1)) === 0
  );
}

/** Throws `code` unless `chunkSize` is a power of two in 4 KiB..4 MiB; `what` names it in the message. */
export function assertChunkSize(chunkSize: number, code: ErrorCode, what = 'chunk size'): void {
  if (!isValidChunkSize(chunkSize)) {
    throw new BlocksnapError(code, `${what} ${chunkSize} is not a power of two in ${MIN_CHUNK_SIZE}..${MAX_CHUNK_SIZE}`);
  }
}

/** Number of chunks of a volume (the last one may be short). No validation: callers check the chunk size first. */
export function chunkCountOf(volumeSize: number, chunkSize: number): number {
  return Math.ceil(volumeSize / chunkSize);
}

/** Plain length of chunk `index` (the last chunk may be short). */
export function chunkLength(geometry: VolumeGeometry, index: number): number {
  return Math.min(geometry.chunkSize, geometry.volumeSize - index * geometry.chunkSize);
}

/**
 * The change tracker's granularity rule: a power of two of at least one
 * sector, with no upper bound. It differs from the chunk-size rule because a
 * tracker may record finer than the chunks a backup sends: the chunk size
 * must then be a multiple of it (a power of two ≥ the granularity always is).
 */
export function isValidTrackingGranularity(granularity: number): boolean {
  return Number.isInteger(granularity) && granularity >= SECTOR_SIZE && (granularity & (granularity - 1)) === 0;
}
