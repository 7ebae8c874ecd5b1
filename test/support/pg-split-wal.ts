import { chown, mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

/**
 * Test helper: `initdb --waldir`, so the data directory and its WAL live on
 * different volumes (the layout consistency groups exist for). The data
 * directory's `pg_wal` is then a symlink to `walDir`. Same settings as
 * PgCluster.initdb (checksums, C locale, trust), run as the OS user.
 */
export async function initdbSplitWal(o: { dataDir: string; walDir: string; binDir?: string; osUser?: string }): Promise<void> {
  const user = o.osUser ?? 'postgres';
  const line = (await readFile('/etc/passwd', 'utf8')).split('\n').find((l) => l.startsWith(`${user}:`));
  const [, , uid, gid] = line?.split(':') ?? [];
  if (!uid || !gid) throw new BlocksnapError('E_PG', `no OS user ${user} in /etc/passwd`);
  for (const d of [o.dataDir, o.walDir]) {
    await mkdir(d, { recursive: true, mode: 0o700 });
    await chown(d, Number(uid), Number(gid));
  }
  const r = await execa(path.join(o.binDir ?? '/usr/lib/postgresql/15/bin', 'initdb'), [
    '-D', o.dataDir, '--waldir', o.walDir, '-U', 'postgres', '-A', 'trust', '--data-checksums', '-E', 'UTF8', '--locale=C',
  ], {
    uid: Number(uid), gid: Number(gid), cwd: '/', extendEnv: false, reject: false, stdin: 'ignore', timeout: 180_000,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C', LANG: 'C', TZ: 'UTC' },
  });
  if (r.exitCode !== 0) throw new BlocksnapError('E_PG', `initdb ${o.dataDir} --waldir ${o.walDir} failed: ${String(r.stderr || r.shortMessage).trim()}`, { cause: r });
}
