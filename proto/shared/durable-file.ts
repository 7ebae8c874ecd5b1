import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, rename, rm, type FileHandle } from 'node:fs/promises';
import { chmodSync, closeSync, mkdirSync, openSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';

/** Mode of every file blocksnap keeps (state, packs, manifests, catalog): owner only. */
export const PRIVATE_FILE_MODE = 0o600;
/** Mode of every directory it creates for them. */
export const PRIVATE_DIR_MODE = 0o700;

export interface DurableWriteOptions {
  /** The file's mode, forced whatever the umask. Default 0600. */
  mode?: number;
  /** Owner given to the file before it becomes visible (the agent is root; PostgreSQL's files must be its own). */
  owner?: { uid: number; gid: number };
  /** Where the temp file is made (same filesystem as the target); default the target's directory. */
  tmpDir?: string;
}

/**
 * The one durable write of blocksnap (agent state, tracker bitmaps, digest
 * maps, manifests, sidecars, PostgreSQL recovery settings): a temp file
 * (O_EXCL, named `.<name>.<rand>.tmp`), filled by `fill`, fsync'ed, renamed
 * over the target, then the target's directory fsync'ed. A crash leaves either
 * the old file or the new one, never a torn one. The mode (and owner) are set
 * on the temp before any data goes in. A directory this creates is 0700, and
 * the directory holding the first one it created is fsync'ed too, so the new
 * entry survives a power loss. On failure the temp is removed and the error
 * is rethrown as is: callers wrap it in their own code.
 */
export async function writeDurable(file: string, fill: (fh: FileHandle) => Promise<void>, o: DurableWriteOptions = {}): Promise<void> {
  const mode = o.mode ?? PRIVATE_FILE_MODE;
  const dir = dirname(file);
  const created = await mkdir(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  if (created !== undefined) await fsyncDir(dirname(resolve(created)));
  const tmp = join(o.tmpDir ?? dir, `.${basename(file)}.${randomBytes(4).toString('hex')}.tmp`);
  const fh = await open(tmp, 'wx', mode);
  try {
    await fh.chmod(mode);
    if (o.owner) await fh.chown(o.owner.uid, o.owner.gid);
    await fill(fh);
    await fh.sync();
  } catch (e) {
    await fh.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw e;
  }
  await fh.close();
  try {
    await rename(tmp, file);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
  await fsyncDir(dir);
}

/** writeDurable of one buffer or string. */
export async function writeFileDurably(file: string, bytes: Uint8Array | string, mode = PRIVATE_FILE_MODE): Promise<void> {
  await writeDurable(file, (fh) => fh.writeFile(bytes), { mode });
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** mkdir -p with 0700 for what it creates, then 0700 on `dir` itself whatever it was (the umask only narrows a mkdir mode). */
export async function makePrivateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  await chmod(dir, PRIVATE_DIR_MODE);
}

/** Synchronous makePrivateDir. */
export function makePrivateDirSync(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  chmodSync(dir, PRIVATE_DIR_MODE);
}

/**
 * Creates `file` empty with `mode` if it does not exist and forces `mode` on
 * it. For SQLite databases: SQLite creates a missing database 0644 and gives
 * its -wal/-shm the database file's mode, so a database made 0600 first keeps
 * all three private.
 */
export function ensureFileMode(file: string, mode = PRIVATE_FILE_MODE): void {
  closeSync(openSync(file, 'a', mode));
  chmodSync(file, mode);
}
