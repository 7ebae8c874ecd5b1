/**
 * prepareDataDir empties pg_replslot/: a copy made from an image must not
 * keep the source's replication slots (PostgreSQL's backup docs: leave them
 * out; pg_basebackup never copies them) — a slot whose client follows the
 * source would hold the copy's WAL for good. For a primary copy and a
 * standby copy alike; the directory itself stays (PostgreSQL needs it). A
 * real PostgreSQL check is in test/lvm/e2e-lvm.test.ts (the primary there
 * streams to its standby through a slot; the mounted image has none).
 */
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { prepareDataDir, type PrepareOptions } from '../../agent/pg/prepare.js';

const LABEL = 'START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-01-01 00:00:00 UTC\nLABEL: img-1\nSTART TIMELINE: 1\n';
const base: PrepareOptions = { labelFile: LABEL, stopLsn: '0/2000138', timeline: 1, version: 150010 };

const dirs: string[] = [];
afterEach(async () => {
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
});

async function dataDir(slots: string[] | null): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'blocksnap-slots-'));
  dirs.push(dir);
  await writeFile(path.join(dir, 'PG_VERSION'), '15\n');
  await mkdir(path.join(dir, 'pg_wal'));
  if (slots) {
    await mkdir(path.join(dir, 'pg_replslot'));
    for (const s of slots) {
      await mkdir(path.join(dir, 'pg_replslot', s));
      await writeFile(path.join(dir, 'pg_replslot', s, 'state'), 'slot state');
    }
  }
  return dir;
}

it('a primary copy: every slot of the source is removed and named, pg_replslot stays', async () => {
  const dir = await dataDir(['bsn_standby', 'sub_orders']);
  const r = await prepareDataDir(dir, { ...base, pauseAtTarget: true });
  expect(r.removed.filter((n) => n.startsWith('pg_replslot/')).sort()).toEqual(['pg_replslot/bsn_standby', 'pg_replslot/sub_orders']);
  expect(await readdir(path.join(dir, 'pg_replslot'))).toEqual([]);
});

it('a standby copy: the source\'s slots are removed too', async () => {
  const dir = await dataDir(['bsn_standby']);
  const r = await prepareDataDir(dir, { ...base, asStandby: true, primaryConninfo: 'host=127.0.0.1 port=5432' });
  expect(r.removed).toContain('pg_replslot/bsn_standby');
  expect(await readdir(path.join(dir, 'pg_replslot'))).toEqual([]);
});

it('no slots, or no pg_replslot at all (before 9.4): nothing removed there', async () => {
  for (const slots of [[], null]) {
    const r = await prepareDataDir(await dataDir(slots), { ...base, pauseAtTarget: true });
    expect(r.removed.filter((n) => n.startsWith('pg_replslot'))).toEqual([]);
  }
});
