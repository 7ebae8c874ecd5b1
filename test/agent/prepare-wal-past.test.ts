/**
 * prepareDataDir removes the WAL files a copy that ends recovery at the stop
 * point never reads — the source's recycled files past the stop point and
 * the WAL before the label's start segment: PostgreSQL would remove or
 * recycle each at the promotion with fsyncs (measured: an 8 GiB pgbench
 * mount's promotion did ≈ 140 flushes for them, a 1 GiB one ≈ 35). What
 * recovery replays (the start LSN's segment to the stop LSN's) stays, and so
 * does an old segment the source has not archived yet (.ready); a standby
 * copy, a symlinked pg_wal and unknown names are left alone.
 */
import { mkdir, mkdtemp, readdir, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { afterEach, describe, expect, it } from 'vitest';
import { prepareDataDir, type PrepareOptions } from '../../agent/pg/prepare.js';

const LABEL = 'START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-01-01 00:00:00 UTC\nLABEL: img-1\nSTART TIMELINE: 1\n';
const base: PrepareOptions = { labelFile: LABEL, stopLsn: '0/2000138', timeline: 1, version: 150010 };
const SEG = 16 * 2 ** 20;
const LABEL_2 = LABEL.replace('0/2000028 (file 000000010000000000000002)', '0/3000028 (file 000000010000000000000003)');
const NEEDED = ['000000010000000000000002'];
const PAST = ['000000010000000000000003', '00000001000000000000003F', '000000010000000100000000'];
const OTHER = ['000000010000000000000002.partial', '00000001.history', 'archive_status', 'xlogtemp.123'];

const dirs: string[] = [];
afterEach(async () => {
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
});

async function dataDir(walElsewhere = false): Promise<{ dir: string; wal: string }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'blocksnap-walpast-'));
  dirs.push(dir);
  await writeFile(path.join(dir, 'PG_VERSION'), '15\n');
  const wal = walElsewhere ? path.join(dir, 'elsewhere') : path.join(dir, 'pg_wal');
  await mkdir(wal);
  if (walElsewhere) await symlink(wal, path.join(dir, 'pg_wal'));
  for (const name of [...NEEDED, ...PAST]) {
    await writeFile(path.join(wal, name), '');
    await truncate(path.join(wal, name), SEG); // sparse, full segment size
  }
  await mkdir(path.join(wal, 'archive_status'));
  for (const name of OTHER.filter((n) => n !== 'archive_status')) await writeFile(path.join(wal, name), 'x');
  return { dir, wal };
}

describe('prepareDataDir: WAL past the stop point', () => {
  it('a copy that ends recovery at the stop point: the recycled segments past it are removed, the rest kept', async () => {
    const { dir, wal } = await dataDir();
    const r = await prepareDataDir(dir, { ...base, pauseAtTarget: true });
    expect(r.removed.sort()).toEqual(PAST.map((n) => `pg_wal/${n}`).sort());
    expect((await readdir(wal)).sort()).toEqual([...NEEDED, ...OTHER].sort());
  });

  it('the segments before the start segment of the label are removed with their .done; one still .ready (not archived) stays', async () => {
    const { dir, wal } = await dataDir();
    // Start in segment 3, stop in 4: 1 and 2 are older than the backup's checkpoint.
    await writeFile(path.join(wal, '000000010000000000000004'), '');
    await truncate(path.join(wal, '000000010000000000000004'), SEG);
    await writeFile(path.join(wal, '000000010000000000000001'), '');
    await truncate(path.join(wal, '000000010000000000000001'), SEG);
    await writeFile(path.join(wal, 'archive_status', '000000010000000000000001.ready'), '');
    await writeFile(path.join(wal, 'archive_status', '000000010000000000000002.done'), '');
    const r = await prepareDataDir(dir, { ...base, labelFile: LABEL_2, stopLsn: '0/4000138', pauseAtTarget: true });
    expect(r.removed.filter((n) => n.startsWith('pg_wal/')).sort()).toEqual([
      'pg_wal/000000010000000000000002', 'pg_wal/00000001000000000000003F', 'pg_wal/000000010000000100000000', 'pg_wal/archive_status/000000010000000000000002.done',
    ].sort());
    expect((await readdir(wal)).sort()).toEqual(['000000010000000000000001', '000000010000000000000003', '000000010000000000000004', ...OTHER].sort());
    expect(await readdir(path.join(wal, 'archive_status'))).toEqual(['000000010000000000000001.ready']);
  });

  it('a segment that cannot be removed: E_STORE_IO naming it, after every other removal has finished', async () => {
    const { dir, wal } = await dataDir();
    const stuck = path.join(wal, PAST[0]!);
    await execa('chattr', ['+i', stuck]); // immutable: unlink fails with EPERM, even for root
    try {
      const e = await prepareDataDir(dir, { ...base, pauseAtTarget: true }).then(() => null, (x: unknown) => x as Error & { code?: string });
      expect(e?.code).toBe('E_STORE_IO');
      expect(e?.message).toContain(stuck);
      expect((await readdir(wal)).sort()).toEqual([...NEEDED, PAST[0]!, ...OTHER].sort());
    } finally {
      await execa('chattr', ['-i', stuck]);
    }
  });

  it('a standby copy keeps them (it does not promote); a symlinked pg_wal is not followed', async () => {
    const standby = await dataDir();
    await prepareDataDir(standby.dir, { ...base, asStandby: true, restoreCommand: '/bin/false' });
    expect((await readdir(standby.wal)).sort()).toEqual([...NEEDED, ...PAST, ...OTHER].sort());
    const linked = await dataDir(true);
    const r = await prepareDataDir(linked.dir, base);
    expect(r.removed.filter((n) => n.startsWith('pg_wal/'))).toEqual([]);
    expect((await readdir(linked.wal)).sort()).toEqual([...NEEDED, ...PAST, ...OTHER].sort());
  });
});
