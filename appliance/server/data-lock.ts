/**
 * One process per appliance data directory, with a lock the kernel releases
 * when the process dies (DESIGN.md §2): `DATA/appliance.lock` is an SQLite
 * database held in `locking_mode=EXCLUSIVE` after a write, i.e. an fcntl
 * write lock on the file that lives exactly as long as the process keeps it
 * open. A pid file cannot do that: after a reboot or kill -9 the pid it
 * names may belong to an unrelated live process.
 *
 * Why SQLite and not flock: Node has no flock, and better-sqlite3 (already
 * used for the catalog) gives the kernel lock without a native addon of its
 * own to build. Taking it costs about 5 ms.
 *
 * `DATA/appliance.pid` is still written, for humans and error messages only.
 */
import Database from 'better-sqlite3';
import { chmodSync, existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { openPrivateDatabase } from '../store/private-sqlite.js';

export const LOCK_FILE = 'appliance.lock';
export const PID_FILE = 'appliance.pid';

export interface DataDirLock {
  /** Releases the lock (idempotent). */
  release(): void;
}

function isBusy(e: unknown): boolean {
  const code = (e as { code?: string })?.code ?? '';
  return code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED');
}

/** Takes the data directory's lock or throws E_BUSY naming the holder. `what` goes into the pid file. */
export function takeDataDirLock(dataDir: string, what = 'appliance'): DataDirLock {
  const file = join(dataDir, LOCK_FILE);
  let db: Database.Database | undefined;
  for (let attempt = 0; !db; attempt++) {
    let open: Database.Database;
    try {
      open = openPrivateDatabase(file);
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `cannot open the lock ${file}: ${(e as Error).message}`, { cause: e });
    }
    try {
      // A short wait covers a CLI probing the lock at this very moment (lockHolder).
      open.pragma('busy_timeout = 1000');
      open.pragma('journal_mode = DELETE');
      open.pragma('locking_mode = EXCLUSIVE');
      open.exec('BEGIN EXCLUSIVE; CREATE TABLE IF NOT EXISTS holder (pid INTEGER, what TEXT); DELETE FROM holder;');
      open.prepare('INSERT INTO holder (pid, what) VALUES (?, ?)').run(process.pid, what);
      open.exec('COMMIT');
      db = open;
    } catch (e) {
      open.close();
      if (isBusy(e)) {
        const [pid, holder] = readPidFile(dataDir);
        throw new BlocksnapError('E_BUSY', `data directory ${dataDir} is in use${pid ? ` by ${holder || 'a process'} pid ${pid}` : ''}`, { cause: e });
      }
      const code = String((e as { code?: string }).code ?? '');
      // A lock file that is not a database holds nothing (no holder could have opened it either): start afresh.
      if (attempt === 0 && (code.startsWith('SQLITE_NOTADB') || code.startsWith('SQLITE_CORRUPT'))) {
        rmSync(file, { force: true });
        continue;
      }
      throw new BlocksnapError('E_STORE_IO', `cannot take the lock ${file}: ${(e as Error).message}`, { cause: e });
    }
  }
  const held = db;
  const pidFile = join(dataDir, PID_FILE);
  // Informational only: a stale one from a dead process is simply replaced.
  writeFileSync(pidFile, `${process.pid} ${what}\n`, { mode: 0o600 });
  chmodSync(pidFile, 0o600); // one left by an older version may be 0644
  let released = false;
  return {
    release() {
      if (released) return;
      released = true;
      rmSync(pidFile, { force: true });
      held.close();
    },
  };
}

/**
 * The pid of the process holding the data directory's lock, or null if none
 * does (a stale pid file is ignored). Probes with a shared lock: a running
 * appliance holds the exclusive one.
 */
export function lockHolder(dataDir: string): number | null {
  const file = join(dataDir, LOCK_FILE);
  if (!existsSync(file)) return null;
  let db: Database.Database | undefined;
  try {
    db = new Database(file, { readonly: true, fileMustExist: true });
    db.pragma('busy_timeout = 0');
    db.prepare('SELECT count(*) FROM sqlite_master').get();
    return null;
  } catch (e) {
    if (!isBusy(e)) return null;
    return readPidFile(dataDir)[0] ?? -1;
  } finally {
    db?.close();
  }
}

/** [pid, what] from the informational pid file, if it is readable. */
function readPidFile(dataDir: string): [number | undefined, string] {
  try {
    const [pid, ...what] = readFileSync(join(dataDir, PID_FILE), 'utf8').trim().split(' ');
    const n = Number(pid);
    return [Number.isInteger(n) && n > 0 ? n : undefined, what.join(' ')];
  } catch {
    return [undefined, ''];
  }
}
