/**
 * Opening an SQLite database so that it and its -wal/-shm files are 0600
 * whatever the umask: SQLite creates a missing database with 0644 (less the
 * umask) and gives -wal/-shm the database file's mode, so the database file
 * is created 0600 first; files left 0644 by an older version are narrowed.
 */
import Database from 'better-sqlite3';
import { chmodSync, existsSync } from 'node:fs';
import { ensureFileMode, PRIVATE_FILE_MODE } from '../../proto/shared/durable-file.js';

export function openPrivateDatabase(file: string, options?: Database.Options): Database.Database {
  if (!options?.readonly) {
    ensureFileMode(file);
    for (const side of [`${file}-wal`, `${file}-shm`]) if (existsSync(side)) chmodSync(side, PRIVATE_FILE_MODE);
  }
  return new Database(file, options);
}
