/**
 * Quarantine (DESIGN.md §2, §6): a damaged object — a pack whose footer or
 * trailer fails its checks, a manifest that does not decode, a catalog SQLite
 * cannot read — is moved out of the store into `DATA/quarantine/` instead of
 * stopping the appliance, next to a durable record of what it was, why it was
 * moved and when. Nothing is deleted: an operator can inspect or restore it.
 *
 *   DATA/quarantine/<stamp>-<name>        the object, moved (rename: same filesystem)
 *   DATA/quarantine/<stamp>-<name>.why.json {"object", "kind", "from", "reason", "at"}
 *
 * The record is written (durably) before the object moves, so a crash in
 * between leaves the object in place and the next start quarantines it again.
 */
import { randomBytes } from 'node:crypto';
import { chmod, readdir, readFile, rename } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { fsyncDir, makePrivateDir, PRIVATE_FILE_MODE, writeFileDurably } from '../../proto/shared/durable-file.js';

export type QuarantineKind = 'pack' | 'manifest' | 'catalog' | 'blob-index';

export interface QuarantineRecord {
  /** What it was, e.g. "pack 3fa2…" or "manifest img-…". */
  object: string;
  kind: QuarantineKind;
  /** Where it was, relative to the data directory. */
  from: string;
  /** Where it is now, relative to the data directory. */
  to: string;
  reason: string;
  at: string;
}

export function quarantineDir(dataDir: string): string {
  return join(dataDir, 'quarantine');
}

/**
 * Moves `file` (and `extra` files next to it, e.g. an SQLite -wal/-shm) to
 * the quarantine with a record. A `file` already gone is recorded all the same.
 */
export async function quarantineFile(
  dataDir: string, file: string, kind: QuarantineKind, object: string, reason: string, extra: string[] = [],
): Promise<QuarantineRecord> {
  const qdir = quarantineDir(dataDir);
  const at = new Date();
  const stamp = `${at.toISOString().replace(/[-:.]/g, '').toLowerCase()}-${randomBytes(2).toString('hex')}`;
  const dest = join(qdir, `${stamp}-${basename(file)}`);
  const record: QuarantineRecord = { object, kind, from: relative(dataDir, file), to: relative(dataDir, dest), reason, at: at.toISOString() };
  try {
    await makePrivateDir(qdir);
    await writeFileDurably(`${dest}.why.json`, Buffer.from(JSON.stringify(record, null, 2) + '\n'));
    const moved = await rename(file, dest).then(() => true, (e) => {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      return false;
    });
    if (moved) await chmod(dest, PRIVATE_FILE_MODE); // it may hold backed-up data: owner only
    for (const f of extra) {
      await rename(f, join(qdir, `${stamp}-${basename(f)}`)).catch((e) => {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      });
    }
    await fsyncDir(dirname(file));
    await fsyncDir(qdir);
  } catch (e) {
    throw new BlocksnapError('E_STORE_IO', `cannot quarantine ${object} (${file}): ${(e as Error).message}`, { cause: e });
  }
  return record;
}

/** Every quarantine record, oldest first. */
export async function listQuarantine(dataDir: string): Promise<QuarantineRecord[]> {
  const qdir = quarantineDir(dataDir);
  let names: string[];
  try {
    names = await readdir(qdir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const out: QuarantineRecord[] = [];
  for (const n of names.filter((x) => x.endsWith(".why.json") && !x.startsWith('.')).sort()) {
    try {
      out.push(JSON.parse(await readFile(join(qdir, n), 'utf8')) as QuarantineRecord);
    } catch {
      // A record that does not parse is itself left for the operator.
    }
  }
  return out;
}

