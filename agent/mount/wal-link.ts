/**
 * pg_wal (pg_xlog before 10) as a symbolic link on a mounted copy.
 *
 * `initdb --waldir` (the WAL on a volume of its own, backed up with the data
 * volume as one image set, DESIGN.md §4.4) leaves pg_wal a link naming the
 * SOURCE's WAL directory by its absolute path. On a copy that link must never
 * be followed: on the source's own host it is the live cluster's WAL, where the
 * mounter would put the image's segments and the copy would then write its own
 * WAL. So before anything is written into the copy the link is re-pointed at
 * the same directory inside the mounted image set — the longest tail of the
 * link's path that exists as a directory in exactly one mounted root (the WAL
 * volume's filesystem is the source's mount point: /srv/wal/pg_wal → ROOT/pg_wal,
 * or ROOT/srv/wal/pg_wal for a volume holding deeper paths) — and a link that
 * leads outside every mounted root is refused (mount the whole image set).
 * The link is rewritten in the copy (its writes go to the mount's overlay),
 * never in the image.
 */
import { lchown, lstat, readlink, realpath, stat, symlink, unlink } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';

const WAL_LINKS = ['pg_wal', 'pg_xlog'];

const inside = (root: string, p: string) => {
  const r = path.relative(root, p);
  return r === '' || (!r.startsWith('..') && !path.isAbsolute(r));
};

async function isRealDir(p: string): Promise<boolean> {
  return lstat(p).then((s) => s.isDirectory(), () => false);
}

/** Where `target` (a WAL link's absolute path on the source) is inside the mounted roots, or null. */
export async function findInRoots(target: string, roots: string[]): Promise<string | null> {
  const parts = path.resolve('/', target).split('/').filter(Boolean);
  for (let k = 0; k < parts.length; k++) {
    const tail = parts.slice(k).join('/');
    const hits: string[] = [];
    for (const root of roots) {
      const candidate = path.join(root, tail);
      if (inside(root, candidate) && (await isRealDir(candidate))) hits.push(candidate);
    }
    if (hits.length === 1) return hits[0]!;
    if (hits.length > 1) return null; // ambiguous: never guess where WAL goes
  }
  return null;
}

/**
 * Re-points a symbolic pg_wal/pg_xlog of `dataDir` into `roots` (the copy's
 * mounted filesystems); returns what was changed, or null when there is no
 * such link (or it already stays inside the roots). E_USAGE when it leads
 * outside every mounted root.
 */
export async function pointWalLinkIntoCopy(dataDir: string, roots: string[]): Promise<{ link: string; was: string; now: string } | null> {
  for (const name of WAL_LINKS) {
    const link = path.join(dataDir, name);
    const st = await lstat(link).catch(() => null);
    if (!st?.isSymbolicLink()) continue;
    const was = await readlink(link);
    const resolved = path.resolve(dataDir, was);
    // A relative link that stays inside the copy (after resolving every link on the way) is the copy's own.
    if (!path.isAbsolute(was)) {
      const real = await realpath(link).catch(() => null);
      if (real && roots.some((r) => inside(r, real))) return null;
    }
    const now = path.isAbsolute(was) ? await findInRoots(resolved, roots) : null;
    if (!now) {
      throw new BlocksnapError('E_USAGE', `${name} of the image is a symbolic link to ${was}, which is not in the mounted image: ` +
        'mount the image set that holds the WAL volume too (the link is never followed outside the copy)');
    }
    const owner = await stat(dataDir);
    await unlink(link);
    await symlink(now, link);
    await lchown(link, owner.uid, owner.gid);
    return { link, was, now };
  }
  return null;
}
