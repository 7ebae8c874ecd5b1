/**
 * A primary's image WAL survives checkpoints during its backup (PostgreSQL 15
 * for real). The capture reads the segments from the backup's start to its
 * stop from the live WAL directory after the stop; checkpoints in between
 * (another backup's start, a manual one, max_wal_size) removed or recycled
 * them and the job failed "cannot read WAL segment". The quiescer now holds
 * the WAL with a temporary replication slot of its session from before the
 * backup start to close.
 */
import { chmod, mkdtemp, realpath, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PgQuiescer } from '../../agent/pg/pg-quiescer.js';
import { captureWal, segmentsBetween, walFacts } from '../../agent/pg/wal-capture.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { findPgServers } from '../../scripts/lab/version-lab.js';
import type { Logger } from '../../proto/shared/log.js';

const pg15 = (await findPgServers()).find((b) => b.major === '15');
if (!pg15) throw new Error('PostgreSQL 15 is part of the lab (/usr/lib/postgresql/15/bin)');

const undo: Array<() => Promise<unknown>> = [];
let primary: PgCluster;

beforeAll(async () => {
  const root = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-wal-hold-')));
  undo.push(() => rm(root, { recursive: true, force: true }));
  await chmod(root, 0o755);
  // Keeps only what a checkpoint needs: nothing beyond the redo point but recycled files.
  primary = new PgCluster({ dataDir: path.join(root, 'primary'), binDir: pg15.binDir, settings: { max_wal_size: '64MB', min_wal_size: '32MB', wal_keep_size: '0', wal_init_zero: 'off' } });
  undo.push(() => primary.destroy());
  await primary.initdb();
  await primary.start();
  await primary.query('CREATE TABLE t (i bigserial PRIMARY KEY)');
  await primary.query('CREATE ROLE bs_norepl LOGIN');
  await primary.query('CREATE ROLE bs_replonly LOGIN REPLICATION');
  await primary.query('GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO bs_norepl');
}, 120_000);

afterAll(async () => {
  for (const f of undo.reverse()) await f().catch(() => undefined);
}, 60_000);

/** Each round a new segment and a checkpoint whose redo point is in it: everything before may go. */
async function checkpoints(n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    await primary.query('INSERT INTO t DEFAULT VALUES');
    await primary.query('SELECT pg_switch_wal()');
    await primary.query('CHECKPOINT');
  }
}

async function noSlotsWithin(ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const left = await slots();
    if (left.length === 0) return;
    if (Date.now() > deadline) throw new Error(`replication slots left after ${ms} ms: ${JSON.stringify(left)}`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

const slots = async () => primary.query<{ slot_name: string; temporary: boolean }>('SELECT slot_name, temporary FROM pg_replication_slots');

function capturingLogger(): { logger: Logger; warnings: string[] } {
  const warnings: string[] = [];
  const logger = { warn: (_o: unknown, msg: string) => warnings.push(msg), info: () => undefined, error: () => undefined, debug: () => undefined } as unknown as Logger;
  return { logger, warnings };
}

describe('WAL hold of a primary backup (PostgreSQL 15)', () => {
  it('6 checkpoints with segment switches between backup start and capture: every segment of the image is still read', async () => {
    const { logger, warnings } = capturingLogger();
    const q = new PgQuiescer({ connection: { ...primary.connectionConfig(), application_name: 'walhold-q' }, role: 'primary', logger });
    await q.connect();
    try {
      const facts = await walFacts(primary.connectionConfig());
      const held = await q.quiesce({ label: 'walhold', fast: true });
      expect(await slots()).toEqual([{ slot_name: `blocksnap_wal_${q.server!.backendPid}`, temporary: true }]);
      await checkpoints(6);
      const done = await q.unquiesce();
      await checkpoints(2); // after the stop, before the capture: what a slow capture start would see
      const names = segmentsBetween(done.timeline ?? 1, held.startLsn!, done.stopLsn!, facts.segmentSize);
      expect(names.length).toBeGreaterThanOrEqual(7);
      // Before the hold: "cannot read WAL segment 0000000100000000000000xx … ENOENT".
      const wal = await captureWal(facts, done.timeline ?? 1, held.startLsn!, done.stopLsn!);
      expect(wal.map((w) => w.name)).toEqual(names);
      expect(warnings).toEqual([]);
    } finally {
      const report = await q.close();
      expect(report).toEqual({ released: [], failed: [] });
    }
    expect(await slots()).toEqual([]);
  }, 120_000);

  it('the next window on the same session replaces the slot; a failed quiesce drops it', async () => {
    const q = new PgQuiescer({ connection: { ...primary.connectionConfig(), application_name: 'walhold-q2' }, role: 'primary' });
    await q.connect();
    try {
      for (let i = 0; i < 2; i++) {
        await q.quiesce({ label: `walhold-${i}`, fast: true });
        expect((await slots()).map((s) => s.slot_name)).toEqual([`blocksnap_wal_${q.server!.backendPid}`]);
        await q.unquiesce();
      }
    } finally {
      await q.close();
    }
    expect(await slots()).toEqual([]);
    // REPLICATION but no right to start a backup: the slot is made, the start fails; nothing may stay.
    const bad = new PgQuiescer({ connection: { ...primary.connectionConfig(), user: 'bs_replonly', application_name: 'walhold-replonly' }, role: 'primary' });
    await bad.connect();
    try {
      await expect(bad.quiesce({ label: 'walhold-replonly', fast: true })).rejects.toMatchObject({ code: 'E_PG' });
      await noSlotsWithin(10_000); // the failed start ends the session: the server drops the slot as the backend exits
    } finally {
      await bad.close();
    }
  }, 120_000);

  it('a role without REPLICATION gets no slot: the backup runs, a warning says the WAL is not held', async () => {
    const { logger, warnings } = capturingLogger();
    const q = new PgQuiescer({ connection: { ...primary.connectionConfig(), user: 'bs_norepl', application_name: 'walhold-norepl' }, role: 'primary', logger });
    await q.connect();
    try {
      await q.quiesce({ label: 'walhold-norepl', fast: true });
      expect(await slots()).toEqual([]);
      const done = await q.unquiesce();
      expect(done.labelFile).toMatch(/^LABEL: walhold-norepl$/m);
    } finally {
      await q.close();
    }
    expect(warnings.some((w) => /no temporary replication slot/.test(w))).toBe(true);
  }, 120_000);
});
