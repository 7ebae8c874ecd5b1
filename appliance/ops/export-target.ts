import { lstat, readFile, realpath } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { basename, dirname, join, sep } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { SIDECAR_FORMAT, WAL_MARKER, WAL_MARKER_FORMAT, sidecarPath, walDirPath } from '../../proto/shared/pg-sidecar.js';

/**
 * What `export --to FILE` may touch, decided before a byte is written.
 *
 * An export owns three paths: FILE, FILE.blocksnap.json (the PostgreSQL
 * sidecar) and FILE.wal/ (its WAL). They are checked together, because a
 * crash-consistent export must remove a sidecar left from an earlier
 * PostgreSQL export (else `prepare` would apply the other image's label):
 *   - FILE: absent, or (with --force) a regular file. Never a symlink (its
 *     target would be what the operator meant — or not), a directory, a
 *     block/char device (writing a device is the restore feature's job, asked
 *     for explicitly there), a FIFO or a socket — not even with --force.
 *   - FILE.blocksnap.json: absent, or (with --force) a regular file that is a
 *     blocksnap sidecar.
 *   - FILE.wal: absent, or (with --force) a real directory carrying
 *     blocksnap's marker file: blocksnap deletes only what it created.
 *   - FILE's directory (resolved through symlinks) must not be inside the
 *     appliance's data directory: an export over catalog.sqlite or a pack
 *     destroys the appliance.
 * Every refusal is E_USAGE (exit 2) naming the path and the reason.
 */
export interface ExportTargetOptions {
  force?: boolean;
  /** The appliance data directory: nothing inside it is a valid target. */
  dataDir?: string;
}

export interface ExportTarget {
  file: string;
  sidecar: string;
  walDir: string;
  /** What exists now and will be replaced (only ever with force). */
  existing: { file: boolean; sidecar: boolean; walDir: boolean };
}


function refuse(path: string, reason: string): BlocksnapError {
  return new BlocksnapError('E_USAGE', `export target ${path}: ${reason}`);
}

async function lstatOrNull(path: string): Promise<Stats | null> {
  try {
    return await lstat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new BlocksnapError('E_USAGE', `export target ${path}: cannot inspect it: ${(e as Error).message}`, { cause: e });
  }
}

function kindOf(st: Stats): string {
  if (st.isSymbolicLink()) return 'a symbolic link';
  if (st.isDirectory()) return 'a directory';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  return 'a regular file';
}

/** Is `child` the directory `dir` or inside it (both real paths)? */
function within(child: string, dir: string): boolean {
  return child === dir || child.startsWith(dir.endsWith(sep) ? dir : dir + sep);
}

/** True when `file` parses as a blocksnap sidecar (anything else is not ours to remove). */
async function isOurSidecar(file: string): Promise<boolean> {
  try {
    return JSON.parse(await readFile(file, 'utf8'))?.format === SIDECAR_FORMAT;
  } catch {
    return false;
  }
}

async function isOurWalDir(dir: string): Promise<boolean> {
  const st = await lstatOrNull(join(dir, WAL_MARKER));
  if (!st?.isFile()) return false;
  try {
    return JSON.parse(await readFile(join(dir, WAL_MARKER), 'utf8'))?.format === WAL_MARKER_FORMAT;
  } catch {
    return false;
  }
}

export async function checkExportTarget(file: string, o: ExportTargetOptions = {}): Promise<ExportTarget> {
  if (!file.startsWith('/')) throw refuse(file, 'must be an absolute path');
  if (basename(file) === '' || file.endsWith('/')) throw refuse(file, 'names a directory, not a file');
  let parent: string;
  try {
    parent = await realpath(dirname(file));
  } catch (e) {
    throw new BlocksnapError('E_USAGE', `export target ${file}: its directory ${dirname(file)} does not exist or is unreadable`, { cause: e });
  }
  const parentSt = await lstatOrNull(parent);
  if (!parentSt?.isDirectory()) throw refuse(file, `${dirname(file)} is not a directory`);
  if (o.dataDir) {
    const data = await realpath(o.dataDir).catch(() => o.dataDir!);
    if (within(parent, data)) {
      throw refuse(file, `it is inside the appliance's data directory ${data}; export somewhere else`);
    }
  }
  // From here on the real parent: a symlinked directory cannot smuggle the file elsewhere later.
  const real = join(parent, basename(file));
  const t: ExportTarget = { file: real, sidecar: sidecarPath(real), walDir: walDirPath(real), existing: { file: false, sidecar: false, walDir: false } };
  const force = o.force ? '' : ' (pass --force to replace it)';

  const fst = await lstatOrNull(real);
  if (fst) {
    if (fst.isBlockDevice() || fst.isCharacterDevice()) {
      throw refuse(file, `it is ${kindOf(fst)}; export writes files only — writing an image onto a device is a restore, not an export, and is refused even with --force`);
    }
    if (fst.isSymbolicLink()) throw refuse(file, 'it is a symbolic link; export neither writes through nor replaces one, even with --force: name the real path');
    if (!fst.isFile()) throw refuse(file, `it is ${kindOf(fst)}; export replaces only a regular file, even with --force`);
    if (!o.force) throw refuse(file, `it exists${force}`);
    t.existing.file = true;
  }
  const sst = await lstatOrNull(t.sidecar);
  if (sst) {
    if (!sst.isFile() || !(await isOurSidecar(t.sidecar))) {
      throw refuse(file, `${t.sidecar} exists and is not a blocksnap sidecar (it is ${kindOf(sst)}); blocksnap does not remove it, even with --force`);
    }
    if (!o.force) throw refuse(file, `a PostgreSQL sidecar ${t.sidecar} exists${force}`);
    t.existing.sidecar = true;
  }
  const wst = await lstatOrNull(t.walDir);
  if (wst) {
    if (!wst.isDirectory() || !(await isOurWalDir(t.walDir))) {
      throw refuse(file, `${t.walDir} exists and was not created by blocksnap (it is ${kindOf(wst)}${wst.isDirectory() ? ` without blocksnap's ${WAL_MARKER} marker` : ''}); blocksnap never deletes it, even with --force`);
    }
    if (!o.force) throw refuse(file, `a WAL directory ${t.walDir} from an earlier export exists${force}`);
    t.existing.walDir = true;
  }
  return t;
}

/**
 * Right before the rename that installs the new file: FILE must still be
 * what the check saw (absent, or a regular file when forced). Narrows the
 * window in which something else could appear there; without --force the
 * install itself is link(2), which never replaces anything.
 */
export async function recheckFile(t: ExportTarget, force: boolean): Promise<void> {
  const st = await lstatOrNull(t.file);
  if (st && !(force && st.isFile())) throw refuse(t.file, `${kindOf(st)} appeared there during the export; nothing was replaced`);
}
