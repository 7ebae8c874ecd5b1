/**
 * pg_wal links on a mounted copy (agent/mount/wal-link.ts): re-pointed into
 * the mounted image set, never left naming the source's WAL directory.
 * The e2e side (verify --restore of a data + WAL image set, the source's WAL
 * directory untouched) is in test/e2e/consistency-group.test.ts.
 */
import { lstat, mkdir, readlink, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { pointWalLinkIntoCopy } from '../../agent/mount/wal-link.js';
import { codeOf } from '../support/error-code.js';
import { tempDirEach } from '../support/temp-dir.js';

describe('pointWalLinkIntoCopy', () => {
  const tmp = tempDirEach('bsn-wal-link-');
  /** A copy mounted as ROOT/data (holding pg/) and ROOT/wal (the WAL volume, holding wal/). */
  async function copy(walTail = 'wal'): Promise<{ dataDir: string; roots: string[]; walRoot: string }> {
    const dataRoot = join(tmp.path, 'mnt', 'pgdata');
    const walRoot = join(tmp.path, 'mnt', 'pgwal');
    await mkdir(join(dataRoot, 'pg'), { recursive: true });
    await mkdir(join(walRoot, walTail), { recursive: true });
    return { dataDir: join(dataRoot, 'pg'), roots: [dataRoot, walRoot], walRoot };
  }

  it('re-points an absolute link (the source\'s /srv/wal-volume/wal) at the same directory of the mounted WAL volume', async () => {
    const c = await copy();
    await symlink('/srv/wal-volume/wal', join(c.dataDir, 'pg_wal'));
    const r = await pointWalLinkIntoCopy(c.dataDir, c.roots);
    expect(r).toEqual({ link: join(c.dataDir, 'pg_wal'), was: '/srv/wal-volume/wal', now: join(c.walRoot, 'wal') });
    expect(await readlink(join(c.dataDir, 'pg_wal'))).toBe(join(c.walRoot, 'wal'));
  });

  it('takes the longest tail of the link that exists in a root (a WAL volume holding deeper paths)', async () => {
    const c = await copy('srv/pgwal/wal');
    await mkdir(join(c.walRoot, 'wal'));
    await symlink('/srv/pgwal/wal', join(c.dataDir, 'pg_xlog'));
    expect((await pointWalLinkIntoCopy(c.dataDir, c.roots))!.now).toBe(join(c.walRoot, 'srv/pgwal/wal'));
  });

  it('refuses (E_USAGE) a link leading outside every mounted root — a data volume mounted without its WAL volume — and leaves it as it was', async () => {
    const c = await copy();
    await symlink('/srv/elsewhere/xlogs', join(c.dataDir, 'pg_wal'));
    expect(await codeOf(pointWalLinkIntoCopy(c.dataDir, c.roots))).toBe('E_USAGE');
    await expect(pointWalLinkIntoCopy(c.dataDir, c.roots)).rejects.toThrow(/symbolic link to \/srv\/elsewhere\/xlogs, which is not in the mounted image/);
    expect(await readlink(join(c.dataDir, 'pg_wal'))).toBe('/srv/elsewhere/xlogs');
  });

  it('refuses an ambiguous link (the tail exists in two roots) rather than guess', async () => {
    const c = await copy();
    await mkdir(join(c.roots[0]!, 'wal'));
    await symlink('/srv/x/wal', join(c.dataDir, 'pg_wal'));
    expect(await codeOf(pointWalLinkIntoCopy(c.dataDir, c.roots))).toBe('E_USAGE');
  });

  it('leaves a plain pg_wal directory and a relative link staying inside the copy alone', async () => {
    const c = await copy();
    await mkdir(join(c.dataDir, 'pg_wal'));
    expect(await pointWalLinkIntoCopy(c.dataDir, c.roots)).toBeNull();
    const d = join(tmp.path, 'mnt', 'pgdata', 'pg2');
    await mkdir(join(d, 'walhere'), { recursive: true });
    await symlink('walhere', join(d, 'pg_wal'));
    expect(await pointWalLinkIntoCopy(d, c.roots)).toBeNull();
    expect((await lstat(join(d, 'pg_wal'))).isSymbolicLink()).toBe(true);
  });

  it('refuses a relative link leading out of the copy', async () => {
    const c = await copy();
    await mkdir(join(tmp.path, 'outside'));
    await symlink('../../../outside', join(c.dataDir, 'pg_wal'));
    expect(await codeOf(pointWalLinkIntoCopy(c.dataDir, c.roots))).toBe('E_USAGE');
  });
});
