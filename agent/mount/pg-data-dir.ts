/**
 * Finding the PostgreSQL data directory inside the mounted filesystems of an
 * image: a directory holding PG_VERSION and global/pg_control, searched a
 * few levels deep (a volume usually holds it at the top or one or two
 * directories down, e.g. /srv/pgdata/15/main). Symlinks are not followed: a
 * link in the image points into the source host's tree, not the mount.
 */
import { readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';

async function isDataDir(dir: string): Promise<boolean> {
  const f = (p: string) => stat(path.join(dir, p)).then((s) => s.isFile(), () => false);
  return (await f('PG_VERSION')) && (await f('global/pg_control'));
}

export async function findDataDirs(roots: string[], maxDepth = 3): Promise<string[]> {
  const found: string[] = [];
  const walk = async (dir: string, depth: number): Promise<void> => {
    if (await isDataDir(dir)) {
      found.push(dir);
      return; // nothing below a data directory is another one
    }
    if (depth >= maxDepth) return;
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const e of entries.sort((a, b) => a.name.localeCompare(b.name))) {
      if (e.isDirectory() && e.name !== 'lost+found') await walk(path.join(dir, e.name), depth + 1);
    }
  };
  for (const r of roots) await walk(r, 0);
  return found;
}

/** The one data directory of the image; none or several is an E_PG error naming what was found. */
export async function findDataDir(roots: string[]): Promise<string> {
  const dirs = await findDataDirs(roots);
  if (dirs.length === 1) return dirs[0]!;
  if (!dirs.length) throw new BlocksnapError('E_PG', `no PostgreSQL data directory (PG_VERSION + global/pg_control) in ${roots.join(', ')}`);
  throw new BlocksnapError('E_PG', `several PostgreSQL data directories in the image: ${dirs.join(', ')}`);
}
