import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, rename, rm } from 'node:fs/promises';
import { chmodSync, closeSync, mkdirSync, openSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';

/** Mode of every file blocksnap keeps (state, packs, manifests, catalog): owner only. */
export const PRIVATE_FILE_MODE = 0o600;
/** Mode of every directory it creates for them. */
export const PRIVATE_DIR_MODE = 0o700;

/**
 * Durable small-file writes shared by agent and appliance state:
 * temp file in the same directory (O_EXCL), write, fsync, rename over the
 * target, fsync the directory. A crash leaves either the old file or the new
 * one, never a torn one; a leftover temp is named `.<name>.<rand>.tmp`.
 * The file gets exactly `mode` whatever the umask (fchmod before the data
 * goes in), and a directory this creates is 0700.
 */
export async function writeFileDurably(file: string, bytes: Uint8Array, mode = PRIVATE_FILE_MODE): Promise<void> {
  const dir = dirname(file);
  await mkdir(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  const tmp = join(dir, `.${basename(file)}.${randomBytes(4).toString('hex')}.tmp`);
  const fh = await open(tmp, 'wx', mode);
  try {
    await fh.chmod(mode);
    await fh.writeFile(bytes);
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
