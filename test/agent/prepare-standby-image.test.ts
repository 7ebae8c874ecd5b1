/**
 * A copy of a STANDBY's image, prepared to end recovery and promote, on
 * PostgreSQL 15 for real. The standby replayed everything an idle primary
 * wrote — its last records a checkpoint and running-xacts, no commit after
 * them — and the image was taken inside the agent's own quiesce (replay
 * paused, minRecoveryPoint pinned, backup started), so its WAL ends exactly at
 * its consistency point. With recovery_target = 'immediate' PostgreSQL 14+
 * refused such a copy ("recovery ended before configured recovery target was
 * reached": 'immediate' stops only before a record read after consistency, or
 * after a commit); the LVM e2e's standby mount failed so. prepare gives a
 * backup taken on a standby no target (prepare.ts, endsAtItsWalEnd).
 */
import { chmod, mkdtemp, readFile, realpath, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PgQuiescer } from '../../agent/pg/pg-quiescer.js';
import { prepareDataDir } from '../../agent/pg/prepare.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { createStreamingStandby, currentLsn, waitReplayed } from '../../scripts/lab/pg-standby.js';
import { findPgServers } from '../../scripts/lab/version-lab.js';

const pg15 = (await findPgServers()).find((b) => b.major === '15');
if (!pg15) throw new Error('PostgreSQL 15 is part of the lab (/usr/lib/postgresql/15/bin)');

const undo: Array<() => Promise<unknown>> = [];
let root: string;
let primary: PgCluster;
let standby: PgCluster;

beforeAll(async () => {
  root = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-standby-image-')));
  undo.push(() => rm(root, { recursive: true, force: true }));
  await chmod(root, 0o755);
  // No autovacuum: nothing may commit on the primary after its checkpoint.
  primary = new PgCluster({ dataDir: path.join(root, 'primary'), binDir: pg15.binDir, settings: { autovacuum: 'off' } });
  undo.push(() => primary.destroy());
  await primary.initdb();
  await primary.start();
  standby = await createStreamingStandby({ primary, build: pg15, dataDir: path.join(root, 'standby'), applicationName: `stimage${process.pid}` });
  undo.push(() => standby.destroy());
}, 180_000);

afterAll(async () => {
  for (const f of undo.reverse()) await f().catch(() => undefined);
}, 120_000);

describe('prepare: a standby image of an idle primary (PostgreSQL 15)', () => {
  it('the copy ends recovery at the end of its WAL, promotes, and holds what the standby had replayed', async () => {
    await primary.query('CREATE TABLE t AS SELECT generate_series(1, 1000) AS i');
    await primary.query('CHECKPOINT');
    await waitReplayed(standby, await currentLsn(primary), 60_000);

    const q = new PgQuiescer({ connection: { ...standby.connectionConfig(), application_name: 'stimage-q' }, role: 'standby' });
    const copyDir = path.join(root, 'copy');
    await q.connect();
    let done;
    try {
      await q.quiesce({ label: 'stimage', fast: true });
      await execa('cp', ['-a', standby.dataDir, copyDir]); // the "snapshot": nothing writes while replay is paused
    } finally {
      done = await q.unquiesce();
      await q.close();
    }
    expect(done.labelFile).toMatch(/^BACKUP FROM: standby$/m);
    const r = await prepareDataDir(copyDir, { labelFile: done.labelFile!, stopLsn: done.stopLsn!, timeline: done.timeline, version: done.version, pauseAtTarget: true });
    expect(r.settings.recovery_target).toBeUndefined();

    const copy = new PgCluster({ dataDir: copyDir, binDir: pg15.binDir });
    undo.push(() => copy.destroy());
    await copy.start(); // before the fix: FATAL "recovery ended before configured recovery target was reached"
    const inRecovery = async () => {
      try {
        return (await copy.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r'))[0]!.r;
      } catch (e) {
        throw new Error(`the copy stopped: ${String(e)}\n${(await readFile(copy.logFile!, 'utf8').catch(() => '')).slice(-1500)}`);
      }
    };
    const deadline = Date.now() + 60_000;
    while (await inRecovery()) {
      if (Date.now() > deadline) throw new Error('the copy did not leave recovery within 60 s');
      await new Promise((res) => setTimeout(res, 100));
    }
    expect((await copy.query<{ n: string }>('SELECT count(*)::text AS n FROM t'))[0]!.n).toBe('1000');
  }, 180_000);
});
