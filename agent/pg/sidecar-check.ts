import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, readFile, realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { parseSidecar, sidecarPath, walDirPath, WAL_MARKER, WAL_MARKER_FORMAT, type PgSidecar } from '../../proto/shared/pg-sidecar.js';
import { parseLsn } from './sql-table.js';

/**
 * Before `prepare --image FILE` writes anything, proves that the sidecar
 * next to FILE belongs to the data it is applied to (DESIGN.md §8). A stale
 * sidecar (left by an older export to the same path) would make PostgreSQL
 * replay another image's label and WAL over this one: silent corruption.
 *
 * The chain checked, link by link:
 *   sidecar → FILE      FILE is a regular file of the image's volume size, and
 *                       the very file the sidecar was written with (inode and
 *                       birth time recorded at export; a later export to the
 *                       same path is a new inode)
 *   FILE → DATADIR      DATADIR's filesystem sits on a loop device backed by
 *                       FILE (same inode), of the image's volume size
 *   sidecar → FILE.wal  the marker names the same image; each segment has the
 *                       recorded size and SHA-256
 *   sidecar → pg_control  the data directory's last checkpoint lies between
 *                       the label's checkpoint and the stop LSN, as it must in
 *                       a snapshot taken inside that backup (9.3+)
 * Any mismatch is E_USAGE naming both sides.
 */
export interface CheckedSidecar {
  sidecar: PgSidecar;
  /** The WAL segments to copy, verified: absolute paths in FILE.wal. */
  walFiles: Array<{ name: string; path: string }>;
}

const mismatch = (m: string) => new BlocksnapError('E_USAGE', `prepare refused, nothing written: ${m}`);

export async function readSidecar(imageFile: string): Promise<PgSidecar> {
  const file = sidecarPath(imageFile);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new BlocksnapError('E_NOT_FOUND', `${file} is missing or unreadable: export the image with blocksnap-appliance export (a crash-consistent image has none)`, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new BlocksnapError('E_FORMAT', `${file} is not JSON`, { cause: e });
  }
  return parseSidecar(json, file);
}

/** major:minor of a dev_t as glibc encodes it (libuv fills st_dev with makedev()). */
function majorMinor(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

async function checkFile(imageFile: string, s: PgSidecar): Promise<{ dev: bigint; ino: bigint }> {
  const st = await stat(imageFile, { bigint: true }).catch((e: unknown) => {
    throw new BlocksnapError('E_NOT_FOUND', `${imageFile}: ${(e as Error).message}`, { cause: e });
  });
  if (!st.isFile()) throw mismatch(`${imageFile} is not a regular file`);
  if (Number(st.size) !== s.image.volumeSize) {
    throw mismatch(`${imageFile} is ${st.size} bytes but the sidecar's image ${s.imageId} is a ${s.image.volumeSize}-byte volume: the sidecar belongs to another image`);
  }
  const birthKnown = s.exportFile.birthtimeNs !== '0' && st.birthtimeNs !== 0n;
  if (String(st.ino) !== s.exportFile.ino || (birthKnown && String(st.birthtimeNs) !== s.exportFile.birthtimeNs)) {
    throw mismatch(
      `${imageFile} is not the file the sidecar of image ${s.imageId} was exported with (inode ${st.ino}, sidecar names inode ${s.exportFile.ino}): ` +
        'the sidecar is stale (the file was exported again or replaced) or the file was copied without it; export the image again',
    );
  }
  return { dev: st.dev, ino: st.ino };
}

async function checkDataOnFile(dataDir: string, imageFile: string, file: { dev: bigint; ino: bigint }, s: PgSidecar): Promise<void> {
  const st = await stat(dataDir, { bigint: true });
  const mm = majorMinor(st.dev);
  let devDir = await realpath(`/sys/dev/block/${mm}`).catch(() => null);
  if (!devDir) throw mismatch(`${dataDir} is not on a block device (device ${mm}); mount ${imageFile} through a loop device and prepare the data directory inside it`);
  const isPartition = await stat(path.join(devDir, 'partition')).then(() => true, () => false);
  if (isPartition) devDir = path.dirname(devDir);
  const backing = await readFile(path.join(devDir, 'loop', 'backing_file'), 'utf8').then((t) => t.trim(), () => null);
  if (backing === null) {
    throw mismatch(`${dataDir} is on /dev/${path.basename(devDir)}, not on a loop device attached to ${imageFile}; prepare checks the data against the exported file it came from`);
  }
  if (backing.endsWith(' (deleted)')) {
    // The loop device holds a file that was since replaced or removed: its path now names another inode.
    throw mismatch(`${dataDir} is on /dev/${path.basename(devDir)}, whose backing file ${backing.slice(0, -' (deleted)'.length)} was replaced or removed after it was attached: it is not ${imageFile} as exported with image ${s.imageId}`);
  }
  const bst = await stat(backing, { bigint: true }).catch(() => null);
  if (!bst || bst.dev !== file.dev || bst.ino !== file.ino) {
    throw mismatch(`${dataDir} is on /dev/${path.basename(devDir)}, whose backing file is ${backing}, not ${imageFile}: the sidecar of image ${s.imageId} does not belong to this data`);
  }
  if (!isPartition) {
    const sectors = Number((await readFile(path.join(devDir, 'size'), 'utf8')).trim());
    if (sectors * 512 !== s.image.volumeSize) {
      throw mismatch(`/dev/${path.basename(devDir)} is ${sectors * 512} bytes but image ${s.imageId} is a ${s.image.volumeSize}-byte volume`);
    }
  }
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const b of createReadStream(file)) h.update(b as Buffer);
  return h.digest('hex');
}

async function checkWal(imageFile: string, s: PgSidecar): Promise<CheckedSidecar['walFiles']> {
  if (s.wal.length === 0) return [];
  const dir = walDirPath(imageFile);
  const marker = await readFile(path.join(dir, WAL_MARKER), 'utf8').then((t) => JSON.parse(t) as { format?: string; imageId?: string }, () => null);
  if (marker?.format !== WAL_MARKER_FORMAT || marker.imageId !== s.imageId) {
    throw mismatch(`${dir} does not hold the WAL of image ${s.imageId} (marker ${marker ? `names ${marker.imageId}` : 'missing'})`);
  }
  const out: CheckedSidecar['walFiles'] = [];
  for (const w of s.wal) {
    const p = path.join(dir, w.name);
    const st = await stat(p).catch(() => null);
    if (!st?.isFile()) throw new BlocksnapError('E_NOT_FOUND', `WAL segment ${w.name} missing from ${dir}`);
    if (st.size !== w.size || (await sha256File(p)) !== w.sha256) throw mismatch(`WAL segment ${p} is not the one exported with image ${s.imageId} (size or SHA-256 differs)`);
    out.push({ name: w.name, path: p });
  }
  return out;
}

/** pg_control's latest checkpoint: ControlFileData starts {u64 sysid, u32 version, u32 catversion, DBState, pg_time_t, XLogRecPtr checkPoint @32}. */
export async function readControlCheckpoint(dataDir: string, serverVersion: number): Promise<bigint> {
  const fh = await open(path.join(dataDir, 'global', 'pg_control'), 'r');
  try {
    const b = Buffer.alloc(40);
    const { bytesRead } = await fh.read(b, 0, 40, 0);
    if (bytesRead < 40) throw new BlocksnapError('E_PG', `${dataDir}/global/pg_control is truncated`);
    // Before 9.3 an XLogRecPtr was {u32 xlogid, u32 xrecoff}.
    return serverVersion >= 90300 ? b.readBigUInt64LE(32) : (BigInt(b.readUInt32LE(32)) << 32n) | BigInt(b.readUInt32LE(36));
  } finally {
    await fh.close();
  }
}

async function checkControl(dataDir: string, s: PgSidecar): Promise<void> {
  const m = /^CHECKPOINT LOCATION: ([0-9A-F]+\/[0-9A-F]+)$/m.exec(s.pg.labelFile);
  if (!m) return; // checkLabel in prepare.ts refuses a malformed label
  let cp: bigint;
  try {
    cp = await readControlCheckpoint(dataDir, s.pg.serverVersion);
  } catch (e) {
    throw new BlocksnapError('E_PG', `cannot read ${dataDir}/global/pg_control`, { cause: e });
  }
  const lo = parseLsn(m[1]!);
  const hi = parseLsn(s.pg.stopLsn);
  if (cp < lo || cp > hi) {
    const fmt = (v: bigint) => `${(v >> 32n).toString(16).toUpperCase()}/${(v & 0xffffffffn).toString(16).toUpperCase()}`;
    throw mismatch(`${dataDir}'s last checkpoint ${fmt(cp)} is outside image ${s.imageId}'s backup (checkpoint ${m[1]} .. stop ${s.pg.stopLsn}): the data is from another point in time`);
  }
}

export async function checkSidecarAgainstData(dataDir: string, imageFile: string): Promise<CheckedSidecar> {
  const sidecar = await readSidecar(imageFile);
  const file = await checkFile(imageFile, sidecar);
  await checkDataOnFile(dataDir, imageFile, file, sidecar);
  const walFiles = await checkWal(imageFile, sidecar);
  await checkControl(dataDir, sidecar);
  return { sidecar, walFiles };
}
