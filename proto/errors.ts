/**
 * Every error blocksnap raises on purpose is a BlocksnapError with a stable
 * `code`; codes travel on the wire (Error.code, JobResult.error_code) and are
 * what tests and operators match on, so they are never renamed.
 */
export const ErrorCodes = {
  E_FRAME_TOO_LARGE: 'E_FRAME_TOO_LARGE',
  E_FRAME_MALFORMED: 'E_FRAME_MALFORMED',
  E_PROTOCOL: 'E_PROTOCOL',
  E_AUTH: 'E_AUTH',
  E_UNKNOWN_JOB: 'E_UNKNOWN_JOB',
  E_UNKNOWN_VOLUME: 'E_UNKNOWN_VOLUME',
  E_BAD_CHUNK: 'E_BAD_CHUNK',
  E_DIGEST_MISMATCH: 'E_DIGEST_MISMATCH',
  E_CHUNK_RANGE: 'E_CHUNK_RANGE',
  E_BASIS: 'E_BASIS',
  E_STORE_CORRUPT: 'E_STORE_CORRUPT',
  E_STORE_IO: 'E_STORE_IO',
  E_NOT_FOUND: 'E_NOT_FOUND',
  E_FORMAT: 'E_FORMAT',
  E_SNAPSHOT: 'E_SNAPSHOT',
  E_DEVICE: 'E_DEVICE',
  E_CONFIG: 'E_CONFIG',
  E_CANCELLED: 'E_CANCELLED',
  E_DISCONNECTED: 'E_DISCONNECTED',
  E_TIMEOUT: 'E_TIMEOUT',
  E_BUSY: 'E_BUSY',
  E_INTERNAL: 'E_INTERNAL',
  E_USAGE: 'E_USAGE',
  E_TRACKER: 'E_TRACKER',
  E_PG: 'E_PG',
  /** A volume's configured device, image and mountpoint are not one volume (agent/snapshot/volume-identity.ts). */
  E_IDENTITY: 'E_IDENTITY',
  /** The image the appliance built is not the one the agent read (end-to-end root mismatch): nothing is committed. */
  E_INTEGRITY: 'E_INTEGRITY',
} as const;

export type ErrorCode = keyof typeof ErrorCodes;

export class BlocksnapError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BlocksnapError';
    this.code = code;
  }
}

export function isBlocksnapError(e: unknown, code?: ErrorCode): e is BlocksnapError {
  return e instanceof BlocksnapError && (code === undefined || e.code === code);
}

/** Wrap anything thrown into a BlocksnapError, keeping the original as cause. */
export function toBlocksnapError(e: unknown, fallback: ErrorCode = 'E_INTERNAL'): BlocksnapError {
  if (e instanceof BlocksnapError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new BlocksnapError(fallback, msg, { cause: e });
}
