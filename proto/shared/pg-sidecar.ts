/**
 * The PostgreSQL sidecar of an exported image (DESIGN.md §8): written by the
 * appliance's `export` next to FILE as FILE.blocksnap.json, read by the
 * agent's `prepare`. Both sides use this one definition.
 *
 * version 2 (version 1 named no image geometry or file and is refused):
 *   format       "blocksnap-pg-sidecar"
 *   version      2
 *   imageId      the catalog image it belongs to
 *   image        { rootDigest, volumeSize, chunkSize }: the image's geometry
 *                and fingerprint (root digest = digest over every chunk)
 *   exportFile   { name, ino, birthtimeNs, size }: the file written with it
 *                (decimal strings for the 64-bit numbers; birthtimeNs "0"
 *                where the filesystem has none)
 *   wal          [{ name, size, sha256 }]: the segments in FILE.wal/
 *   pg           label, tablespace map, LSNs, timeline, server version, …
 * FILE.wal/.blocksnap-wal holds { format: "blocksnap-pg-wal", imageId }.
 */
import { BlocksnapError } from '../errors.js';

export const SIDECAR_FORMAT = 'blocksnap-pg-sidecar';
export const SIDECAR_VERSION = 2;
export const WAL_MARKER = '.blocksnap-wal';
export const WAL_MARKER_FORMAT = 'blocksnap-pg-wal';
export const sidecarPath = (file: string): string => `${file}.blocksnap.json`;
export const walDirPath = (file: string): string => `${file}.wal`;

export interface PgSidecarInfo {
  labelFile: string;
  spcmapFile: string;
  startLsn: string;
  stopLsn: string;
  timeline: number;
  serverVersion: number;
  [k: string]: unknown;
}

export interface PgSidecar {
  format: typeof SIDECAR_FORMAT;
  version: typeof SIDECAR_VERSION;
  imageId: string;
  image: { rootDigest: string; volumeSize: number; chunkSize: number };
  exportFile: { name: string; ino: string; birthtimeNs: string; size: number };
  wal: Array<{ name: string; size: number; sha256: string }>;
  pg: PgSidecarInfo;
}

const HEX64 = /^[0-9a-f]{64}$/;
const DEC = /^\d+$/;
const WAL_NAME = /^[0-9A-F]{24}$/;

/** Validates a parsed sidecar; `where` names the file in errors. */
export function parseSidecar(v: unknown, where: string): PgSidecar {
  const bad = (m: string) => new BlocksnapError('E_FORMAT', `${where}: ${m}`);
  const s = v as Partial<PgSidecar> | null;
  if (s?.format !== SIDECAR_FORMAT) throw bad('not a blocksnap PostgreSQL sidecar');
  if (s.version !== SIDECAR_VERSION) {
    throw bad(`sidecar version ${String(s.version)} does not name the image file it belongs to; export the image again with this blocksnap`);
  }
  if (typeof s.imageId !== 'string' || !s.imageId) throw bad('imageId');
  const i = s.image;
  if (!i || !HEX64.test(String(i.rootDigest)) || !Number.isSafeInteger(i.volumeSize) || !Number.isSafeInteger(i.chunkSize)) throw bad('image geometry');
  const f = s.exportFile;
  if (!f || typeof f.name !== 'string' || !DEC.test(String(f.ino)) || !DEC.test(String(f.birthtimeNs)) || !Number.isSafeInteger(f.size)) throw bad('exportFile');
  if (!Array.isArray(s.wal) || s.wal.some((w) => !WAL_NAME.test(String(w?.name)) || !Number.isSafeInteger(w.size) || !HEX64.test(String(w.sha256)))) throw bad('wal');
  const p = s.pg;
  if (!p || typeof p.labelFile !== 'string' || typeof p.stopLsn !== 'string' || typeof p.serverVersion !== 'number') throw bad('pg');
  return s as PgSidecar;
}
