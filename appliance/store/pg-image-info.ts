import { BlocksnapError } from '../../proto/errors.js';

/**
 * The PostgreSQL part of an image (manifest field `pg`, catalog column
 * images.pg_json): what the quiesce window returned, and the WAL pieces the
 * image needs to reach its stop LSN. Without the label a restore may
 * recover from the wrong checkpoint (seed 002): it travels with the image.
 */
export interface WalPieceRef {
  offset: number;
  length: number;
  /** hex SHA-256 of the plain bytes: a blob in the store; 64 zeros = an all-zero piece (not stored). */
  digest: string;
}

export interface WalFileRef {
  name: string;
  size: number;
  pieces: WalPieceRef[];
}

export interface PgImageInfo {
  labelFile: string;
  spcmapFile: string;
  startLsn: string;
  stopLsn: string;
  timeline: number;
  replayLsn: string;
  exclusive: boolean;
  serverVersion: number;
  role: 'primary' | 'standby';
  pausedSeconds: number;
  backupSeconds: number;
  walSegmentSize: number;
  wal: WalFileRef[];
}

const LSN = /^([0-9A-F]{1,8}\/[0-9A-F]{1,8})?$/;
const WAL_NAME = /^[0-9A-F]{24}$/;
const HEX = /^[0-9a-f]{64}$/;

function bad(m: string): BlocksnapError {
  return new BlocksnapError('E_FORMAT', `manifest pg: ${m}`);
}

export function validatePgInfo(v: unknown): PgImageInfo {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw bad('not an object');
  const p = v as Record<string, unknown>;
  for (const k of ['labelFile', 'spcmapFile', 'startLsn', 'stopLsn', 'replayLsn', 'role'] as const) {
    if (typeof p[k] !== 'string') throw bad(`${k} must be a string`);
  }
  for (const k of ['startLsn', 'stopLsn', 'replayLsn'] as const) if (!LSN.test(p[k] as string)) throw bad(`${k} is not an LSN`);
  if (p.role !== 'primary' && p.role !== 'standby') throw bad('role');
  for (const k of ['timeline', 'serverVersion', 'pausedSeconds', 'backupSeconds', 'walSegmentSize'] as const) {
    if (typeof p[k] !== 'number' || !Number.isFinite(p[k]) || (p[k] as number) < 0) throw bad(`${k} must be a number ≥ 0`);
  }
  if (typeof p.exclusive !== 'boolean') throw bad('exclusive must be a boolean');
  if (!Array.isArray(p.wal)) throw bad('wal must be an array');
  for (const f of p.wal as unknown[]) {
    const w = f as Record<string, unknown>;
    if (typeof w?.name !== 'string' || !WAL_NAME.test(w.name)) throw bad('wal file name');
    if (typeof w.size !== 'number' || !Array.isArray(w.pieces)) throw bad(`wal ${w.name}`);
    let covered = 0;
    for (const piece of w.pieces as Record<string, unknown>[]) {
      if (piece.offset !== covered || typeof piece.length !== 'number' || piece.length <= 0) throw bad(`wal ${w.name}: pieces must cover the file in order`);
      if (typeof piece.digest !== 'string' || !HEX.test(piece.digest)) throw bad(`wal ${w.name}: piece digest`);
      covered += piece.length;
    }
    if (covered !== w.size) throw bad(`wal ${w.name}: pieces cover ${covered} of ${w.size} bytes`);
  }
  return p as unknown as PgImageInfo;
}
