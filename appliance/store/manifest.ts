/**
 * Image manifest (DESIGN.md §3.4): `store/manifests/<imageId>.json`, the
 * commit record of an image. Its rename into `store/manifests/` is the commit
 * point (§5), so it is written to `store/tmp/`, fsync'ed, renamed, and the
 * directory fsync'ed. It is never overwritten.
 *
 * ```json
 * { "format": "blocksnap-manifest", "version": 1, "imageId": "img-…",
 *   "createdAt": "ISO-8601", "agent": "db1", "volume": "pgdata",
 *   "volumeSize": 4294967296, "chunkSize": 65536,
 *   "kind": "full" | "incremental", "basisImageId": null | "img-…",
 *   "jobId": "job-…", "rootDigest": "hex", "stats": { "name": number, … },
 *   "pg": { … },                                  // optional, app-consistent images
 *   "set": { "id": "set-…", "images": ["img-…", …] },  // optional, consistency groups
 *   "checksum": "hex" }
 * ```
 *
 * `set` makes the image one member of an image set (a consistency group,
 * DESIGN.md §4.4): `images` lists every member's image id, this one
 * included. A set is visible only when every member's manifest exists;
 * start-up roll-forward deletes the manifests of an incomplete set (§5).
 *
 * `checksum` = hex SHA-256 of the canonical JSON of the manifest with
 * checksum = "": object keys sorted by code unit, no whitespace, values as
 * JSON.stringify writes them. The file holds that canonical JSON (with the
 * real checksum) and a final newline; a reader re-canonicalises, so the check
 * does not depend on formatting.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { imageGeometry } from '../../proto/shared/image-root.js';
import { validatePgInfo, type PgImageInfo } from './pg-image-info.js';
import { fsyncDir, PRIVATE_DIR_MODE, writeDurable } from '../../proto/shared/durable-file.js';

export const MANIFEST_FORMAT = 'blocksnap-manifest';
export const MANIFEST_VERSION = 1;

export type ImageKind = 'full' | 'incremental';
export type ManifestStats = Record<string, number>;

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: typeof MANIFEST_VERSION;
  imageId: string;
  createdAt: string;
  agent: string;
  volume: string;
  volumeSize: number;
  chunkSize: number;
  kind: ImageKind;
  basisImageId: string | null;
  jobId: string;
  rootDigest: string;
  stats: ManifestStats;
  /** PostgreSQL label, LSNs and WAL of an app-consistent image; absent for crash-consistent ones. */
  pg?: PgImageInfo;
  /** The image set this image belongs to (consistency group); absent for a lone volume's image. */
  set?: ImageSet;
  checksum: string;
}

export interface ImageSet {
  id: string;
  /** Every member's image id, this one included, in the group's order. */
  images: string[];
}

export type ManifestFields = Omit<Manifest, 'format' | 'version' | 'checksum' | 'imageId' | 'createdAt'> & {
  imageId?: string;
  createdAt?: string;
};

const IMAGE_ID_RE = /^img-[0-9]{8}t[0-9]{6}z-[0-9a-f]{8}$/;
const SET_ID_RE = /^set-[0-9]{8}t[0-9]{6}z-[0-9a-f]{8}$/;
const MAX_SET_IMAGES = 64;
const HEX_DIGEST_RE = /^[0-9a-f]{64}$/;
const KEYS = [
  'agent', 'basisImageId', 'checksum', 'chunkSize', 'createdAt', 'format', 'imageId',
  'jobId', 'kind', 'rootDigest', 'stats', 'version', 'volume', 'volumeSize',
];

/** `img-<UTC yyyymmddThhmmssZ, lowercased>-<8 hex random>`; sorts by time. */
export function newImageId(now: Date = new Date()): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '').toLowerCase();
  return `img-${stamp}-${randomBytes(4).toString('hex')}`;
}

/** `set-<UTC yyyymmddThhmmssZ>-<8 hex random>`, like an image id. */
export function newSetId(now: Date = new Date()): string {
  return `set-${newImageId(now).slice('img-'.length)}`;
}

export function isValidSetId(id: unknown): id is string {
  return typeof id === 'string' && SET_ID_RE.test(id);
}

function validateSet(v: unknown, imageId: unknown): void {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw bad('set must be an object');
  const set = v as Record<string, unknown>;
  if (Object.keys(set).sort().join() !== 'id,images') throw bad('set must have exactly id and images');
  if (!isValidSetId(set.id)) throw bad(`invalid set id ${String(set.id)}`);
  const images = set.images;
  if (!Array.isArray(images) || images.length < 1 || images.length > MAX_SET_IMAGES) throw bad(`set.images must list 1..${MAX_SET_IMAGES} images`);
  if (!images.every(isValidImageId) || new Set(images).size !== images.length) throw bad('set.images must be distinct valid image ids');
  if (!images.includes(imageId as string)) throw bad('set.images does not list the image itself');
}

/** The only image ids ever used to build a path. */
export function isValidImageId(id: unknown): id is string {
  return typeof id === 'string' && IMAGE_ID_RE.test(id);
}

function bad(message: string): BlocksnapError {
  return new BlocksnapError('E_FORMAT', `manifest: ${message}`);
}

export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj).filter((k) => obj[k] !== undefined).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

export function manifestChecksum(m: Manifest): string {
  return createHash('sha256').update(canonicalJson({ ...m, checksum: '' }), 'utf8').digest('hex');
}

/** Check every field (not the checksum); returns the value typed. */
export function validateManifest(v: unknown): Manifest {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw bad('not a JSON object');
  const m = v as Record<string, unknown>;
  const keys = Object.keys(m).filter((k) => k !== 'pg' && k !== 'set').sort();
  if (keys.join() !== KEYS.join()) throw bad(`fields [${keys.join(', ')}] are not the version 1 fields`);
  if ('pg' in m) validatePgInfo(m.pg);
  if ('set' in m) validateSet(m.set, m.imageId);
  if (m.format !== MANIFEST_FORMAT) throw bad(`format ${String(m.format)}`);
  if (m.version !== MANIFEST_VERSION) throw bad(`unsupported version ${String(m.version)}`);
  if (!isValidImageId(m.imageId)) throw bad(`invalid image id ${String(m.imageId)}`);
  if (typeof m.createdAt !== 'string' || Number.isNaN(Date.parse(m.createdAt)) ||
      new Date(m.createdAt).toISOString() !== m.createdAt) {
    throw bad(`createdAt ${String(m.createdAt)} is not an ISO-8601 UTC timestamp`);
  }
  for (const k of ['agent', 'volume', 'jobId'] as const) {
    if (typeof m[k] !== 'string' || m[k] === '') throw bad(`${k} must be a non-empty string`);
  }
  if (typeof m.volumeSize !== 'number' || typeof m.chunkSize !== 'number') throw bad('sizes must be numbers');
  try {
    imageGeometry(m.volumeSize, m.chunkSize);
  } catch (e) {
    throw new BlocksnapError('E_FORMAT', `manifest: ${(e as Error).message}`, { cause: e });
  }
  if (m.kind === 'full') {
    if (m.basisImageId !== null) throw bad('a full image has no basis');
  } else if (m.kind === 'incremental') {
    if (!isValidImageId(m.basisImageId) || m.basisImageId === m.imageId) {
      throw bad(`incremental needs a valid basis image id, got ${String(m.basisImageId)}`);
    }
  } else {
    throw bad(`kind ${String(m.kind)}`);
  }
  if (typeof m.rootDigest !== 'string' || !HEX_DIGEST_RE.test(m.rootDigest)) throw bad('rootDigest is not hex SHA-256');
  const stats = m.stats;
  if (stats === null || typeof stats !== 'object' || Array.isArray(stats)) throw bad('stats must be an object');
  for (const [k, n] of Object.entries(stats)) {
    if (typeof n !== 'number' || !Number.isFinite(n)) throw bad(`stats.${k} must be a finite number`);
  }
  if (typeof m.checksum !== 'string') throw bad('checksum must be a string');
  return m as unknown as Manifest;
}

/** Complete and seal a manifest: fresh id and time unless given, checksum set. */
export function buildManifest(fields: ManifestFields): Manifest {
  const m: Manifest = {
    format: MANIFEST_FORMAT,
    version: MANIFEST_VERSION,
    imageId: fields.imageId ?? newImageId(),
    createdAt: fields.createdAt ?? new Date().toISOString(),
    agent: fields.agent,
    volume: fields.volume,
    volumeSize: fields.volumeSize,
    chunkSize: fields.chunkSize,
    kind: fields.kind,
    basisImageId: fields.basisImageId,
    jobId: fields.jobId,
    rootDigest: fields.rootDigest,
    stats: { ...fields.stats },
    ...(fields.pg ? { pg: fields.pg } : {}),
    ...(fields.set ? { set: { id: fields.set.id, images: [...fields.set.images] } } : {}),
    checksum: '',
  };
  validateManifest(m);
  m.checksum = manifestChecksum(m);
  return m;
}

export function encodeManifest(m: Manifest): Buffer {
  validateManifest(m);
  if (m.checksum !== manifestChecksum(m)) throw bad(`checksum of ${m.imageId} does not match its content`);
  return Buffer.from(`${canonicalJson(m)}\n`, 'utf8');
}

/** Parse, validate and verify; a checksum mismatch is E_STORE_CORRUPT. */
export function decodeManifest(bytes: Buffer | string): Manifest {
  let v: unknown;
  try {
    v = JSON.parse(typeof bytes === 'string' ? bytes : bytes.toString('utf8'));
  } catch (e) {
    throw new BlocksnapError('E_FORMAT', `manifest: not JSON: ${(e as Error).message}`, { cause: e });
  }
  const m = validateManifest(v);
  if (m.checksum !== manifestChecksum(m)) {
    throw new BlocksnapError('E_STORE_CORRUPT', `manifest ${m.imageId}: checksum mismatch`);
  }
  return m;
}

export function manifestsDir(storeDir: string): string {
  return path.join(storeDir, 'manifests');
}

export function manifestPath(storeDir: string, imageId: string): string {
  if (!isValidImageId(imageId)) throw bad(`invalid image id ${JSON.stringify(imageId)}`);
  return path.join(manifestsDir(storeDir), `${imageId}.json`);
}


/** mkdir -p, making a new directory's own entry durable too. */
async function ensureDir(dir: string): Promise<void> {
  const abs = path.resolve(dir);
  const first = await fs.mkdir(abs, { recursive: true, mode: PRIVATE_DIR_MODE });
  if (first === undefined) return;
  for (let d = abs; d !== path.dirname(d); d = path.dirname(d)) {
    await fsyncDir(path.dirname(d));
    if (d === path.resolve(first)) break;
  }
}

function ioError(message: string, e: unknown): BlocksnapError {
  const code = (e as NodeJS.ErrnoException)?.code === 'ENOENT' ? 'E_NOT_FOUND' : 'E_STORE_IO';
  return new BlocksnapError(code, `${message}: ${(e as Error)?.message ?? String(e)}`, { cause: e });
}

/** Commit an image: durable when this resolves. Refuses to replace a manifest. */
export async function writeManifest(storeDir: string, m: Manifest): Promise<string> {
  const bytes = encodeManifest(m);
  const dest = manifestPath(storeDir, m.imageId);
  const tmpDir = path.join(storeDir, 'tmp');
  try {
    await ensureDir(tmpDir);
    await ensureDir(manifestsDir(storeDir));
  } catch (e) {
    throw ioError(`manifest ${m.imageId}: cannot create store directories`, e);
  }
  // Image ids carry 32 random bits per second, so this check only guards
  // against a caller committing the same manifest twice.
  if (await fs.stat(dest).then(() => true, () => false)) {
    throw new BlocksnapError('E_STORE_IO', `manifest ${m.imageId} already exists`);
  }
  try {
    // The temp goes to store/tmp/ (emptied at open), the file is 0600 whatever the umask (DESIGN.md §2).
    await writeDurable(dest, (fh) => fh.writeFile(bytes), { tmpDir });
  } catch (e) {
    throw ioError(`manifest ${m.imageId}: write failed`, e);
  }
  return dest;
}

/** Read and verify; the id inside must be the one asked for. */
export async function readManifest(storeDir: string, imageId: string): Promise<Manifest> {
  const file = manifestPath(storeDir, imageId);
  let bytes: Buffer;
  try {
    bytes = await fs.readFile(file);
  } catch (e) {
    throw ioError(`manifest ${imageId}`, e);
  }
  const m = decodeManifest(bytes);
  if (m.imageId !== imageId) {
    throw new BlocksnapError('E_STORE_CORRUPT', `manifest file ${imageId}.json holds image ${m.imageId}`);
  }
  return m;
}

/** Image ids of committed manifests, sorted (= by creation time). */
export async function listManifests(storeDir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await fs.readdir(manifestsDir(storeDir));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw ioError('cannot list manifests', e);
  }
  const ids: string[] = [];
  for (const name of names) {
    if (!name.endsWith('.json')) continue;
    const id = name.slice(0, -'.json'.length);
    if (isValidImageId(id)) ids.push(id);
  }
  return ids.sort();
}

/**
 * Removes the manifest of an image of an incomplete set (start-up roll-forward
 * only, DESIGN.md §5): it was never visible, so this is garbage collection,
 * not a change to a committed image. Durable when this resolves.
 */
export async function removeManifest(storeDir: string, imageId: string): Promise<void> {
  const file = manifestPath(storeDir, imageId);
  try {
    await fs.rm(file, { force: true });
    await fsyncDir(manifestsDir(storeDir));
  } catch (e) {
    throw ioError(`manifest ${imageId}: cannot remove`, e);
  }
}
