/**
 * A standby image holds the checkpoint its backup label names, while the
 * primary keeps writing checkpoints (PostgreSQL 15 for real).
 *
 * A restartpoint removes or recycles the segments before its redo point.
 * The quiescer used to start the standby's backup first (the label names the
 * newest restartpoint), then pause replay and CHECKPOINT (to pin
 * minRecoveryPoint): a checkpoint record replayed between the two — the
 * primary's own backup start when both nodes' jobs run at once — became a new
 * restartpoint that removed the segment of the label's checkpoint before the
 * snapshot. The LVM e2e's mounted standby image then stopped with "could not
 * locate required checkpoint record" (CI of stop 18). Here the primary
 * switches segments and checkpoints in a loop the whole time, and every
 * cycle's copy, taken while quiesced as a snapshot would be, must hold the
 * label's segments and start: PostgreSQL promotes it with the standby's rows.
 */
import { chmod, mkdtemp, readdir, readFile, realpath, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PgQuiescer } from '../../agent/pg/pg-quiescer.js';
import { prepareDataDir } from '../../agent/pg/prepare.js';
import { parseLsn, walFileName } from '../../agent/pg/sql-table.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { createStreamingStandby, currentLsn, waitReplayed } from '../../scripts/lab/pg-standby.js';
import { findPgServers } from '../../scripts/lab/version-lab.js';
import type { Logger } from '../../proto/shared/log.js';

const pg15 = (await findPgServers()).find((b) => b.major === '15');
if (!pg15) throw new Error('PostgreSQL 15 is part of the lab (/usr/lib/postgresql/15/bin)');

const CYCLES = 5;
const SEGMENT = 16 << 20;
// Small pg_wal (cheap copies) and no zero-filling of the many new segments the switches make.
// The primary keeps 16 segments for the slot-less standby, which may lag 8 behind; the
// standby keeps none beyond its restartpoint (the default): what it removes is the question.
const SETTINGS = { max_wal_size: '64MB', min_wal_size: '32MB', wal_init_zero: 'off' };
const PRIMARY_SETTINGS = { ...SETTINGS, wal_keep_size: '256MB' };
const MAX_LAG = 8 * SEGMENT;

const undo: Array<() => Promise<unknown>> = [];
let root: string;
let primary: PgCluster;
let standby: PgCluster;

beforeAll(async () => {
  root = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-standby-label-')));
  undo.push(() => rm(root, { recursive: true, force: true }));
  await chmod(root, 0o755);
  primary = new PgCluster({ dataDir: path.join(root, 'primary'), binDir: pg15.binDir, settings: PRIMARY_SETTINGS });
  undo.push(() => primary.destroy());
  await primary.initdb();
  await primary.start();
  await primary.query('CREATE TABLE churn (i bigserial PRIMARY KEY, at timestamptz DEFAULT now())');
  standby = await createStreamingStandby({ primary, build: pg15, dataDir: path.join(root, 'standby'), settings: SETTINGS, applicationName: `stlabel${process.pid}` });
  undo.push(() => standby.destroy());
  await waitReplayed(standby, await currentLsn(primary), 60_000);
}, 180_000);

afterAll(async () => {
  for (const f of undo.reverse()) await f().catch(() => undefined);
}, 120_000);

/**
 * The primary, until stopped: a row, a segment switch, a checkpoint, as fast
 * as it goes while the standby has received all but MAX_LAG of it (further
 * ahead, the primary would remove a segment the slot-less standby still
 * needs, and replay would stop for good).
 */
function churn(): { stop: () => Promise<number> } {
  const c = new pg.Client({ ...primary.connectionConfig(), application_name: 'stlabel-churn' });
  const s = new pg.Client({ ...standby.connectionConfig(), application_name: 'stlabel-churn-watch' });
  let running = true;
  let rounds = 0;
  const done = (async () => {
    await c.connect();
    await s.connect();
    try {
      while (running) {
        await c.query('INSERT INTO churn DEFAULT VALUES');
        await c.query('SELECT pg_switch_wal()');
        const lsn = (await c.query('CHECKPOINT; SELECT pg_current_wal_lsn()::text AS lsn') as unknown as pg.QueryResult[])[1]!.rows[0].lsn as string;
        const deadline = Date.now() + 30_000;
        while (parseLsn((await s.query('SELECT pg_last_wal_receive_lsn()::text AS lsn')).rows[0].lsn as string) + BigInt(MAX_LAG) < parseLsn(lsn)) {
          if (Date.now() > deadline) throw new Error(`the standby did not receive ${lsn} within 30 s`);
          await new Promise((res) => setTimeout(res, 2));
        }
        rounds++;
      }
    } finally {
      await c.end().catch(() => undefined);
      await s.end().catch(() => undefined);
    }
  })();
  return {
    stop: async () => {
      running = false;
      await done;
      return rounds;
    },
  };
}

/**
 * The "snapshot": `cp -a` while replay is paused. The walreceiver still
 * writes what it receives — a temp file it renames into place may vanish
 * under cp, which is the one failure accepted (that WAL is past the pause).
 */
async function snapshotCopy(from: string, to: string): Promise<void> {
  const r = await execa('cp', ['-a', from, to], { reject: false, stdin: 'ignore' });
  if (r.exitCode === 0) return;
  const lines = String(r.stderr).split('\n').filter(Boolean);
  if (lines.length === 0 || lines.some((l) => !/cannot stat '.*\/pg_wal\/xlogtemp\.\d+': No such file or directory$/.test(l))) {
    throw new Error(`cp -a ${from} ${to} failed: ${String(r.stderr)}`);
  }
}

function labelLsn(label: string, key: string): bigint {
  const m = new RegExp(`^${key}: ([0-9A-F]+/[0-9A-F]+)`, 'm').exec(label);
  if (!m) throw new Error(`no ${key} in the label:\n${label}`);
  return parseLsn(m[1]!);
}

describe('quiesce of a standby while the primary checkpoints (PostgreSQL 15)', () => {
  it(`${CYCLES} copies taken while quiesced hold the label's checkpoint segment and start with the standby's rows`, async () => {
    const load = churn();
    const stopLoad = (() => {
      let p: Promise<number> | null = null;
      return () => (p ??= load.stop());
    })();
    undo.push(stopLoad);
    const q = new PgQuiescer({ connection: { ...standby.connectionConfig(), application_name: 'stlabel-q' }, role: 'standby' });
    await q.connect();
    undo.push(() => q.close());
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      const copyDir = path.join(root, `copy${cycle}`);
      let rowsSeen = 0;
      let done: Awaited<ReturnType<PgQuiescer['unquiesce']>> | undefined;
      await q.quiesce({ label: `stlabel-${cycle}`, fast: true });
      try {
        // Replay is paused: what the standby shows now is what its snapshot holds.
        rowsSeen = Number((await standby.query<{ n: string }>('SELECT count(*)::text AS n FROM churn'))[0]!.n);
        await snapshotCopy(standby.dataDir, copyDir);
      } finally {
        done = await q.unquiesce();
      }
      const label = done.labelFile!;
      expect(label).toMatch(/^BACKUP FROM: standby$/m);
      const timeline = Number(/^START TIMELINE: (\d+)$/m.exec(label)?.[1] ?? 1);
      // No restartpoint after the backup start: the copy's pg_control names the label's checkpoint.
      const control = String((await execa(path.join(pg15.binDir, 'pg_controldata'), [copyDir])).stdout);
      const latest = /^Latest checkpoint location:\s+(\S+)$/m.exec(control)?.[1];
      expect(latest && parseLsn(latest), `cycle ${cycle}: pg_control's latest checkpoint vs the label\n${label}`).toBe(labelLsn(label, 'CHECKPOINT LOCATION'));
      const wal = new Set(await readdir(path.join(copyDir, 'pg_wal')));
      for (const key of ['START WAL LOCATION', 'CHECKPOINT LOCATION']) {
        const seg = walFileName(timeline, labelLsn(label, key), SEGMENT);
        expect(wal.has(seg), `cycle ${cycle}: the segment of the label's ${key} (${seg}) in the copy's pg_wal [${[...wal].filter((n) => /^[0-9A-F]{24}$/.test(n)).join(' ')}]\n${label}`).toBe(true);
      }

      await prepareDataDir(copyDir, { labelFile: label, stopLsn: done.stopLsn!, timeline: done.timeline, version: done.version, pauseAtTarget: true });
      const copy = new PgCluster({ dataDir: copyDir, binDir: pg15.binDir });
      try {
        await copy.start();
        const deadline = Date.now() + 60_000;
        for (;;) {
          const r = await copy.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r').catch(async (e: unknown) => {
            throw new Error(`cycle ${cycle}: the copy stopped: ${String(e)}\n${(await readFile(copy.logFile!, 'utf8').catch(() => '')).slice(-1500)}`);
          });
          if (!r[0]!.r) break;
          if (Date.now() > deadline) throw new Error(`cycle ${cycle}: the copy did not leave recovery within 60 s`);
          await new Promise((res) => setTimeout(res, 100));
        }
        const rows = Number((await copy.query<{ n: string }>('SELECT count(*)::text AS n FROM churn'))[0]!.n);
        expect(rows, `cycle ${cycle}`).toBeGreaterThanOrEqual(rowsSeen);
      } finally {
        await copy.destroy();
      }
    }
    const rounds = await stopLoad();
    // The race needs checkpoints during the quiesces: many rounds, not a handful.
    expect(rounds).toBeGreaterThan(CYCLES * 3);
    console.log(`${CYCLES} standby copies, ${rounds} primary checkpoints with segment switches meanwhile`);
  }, 300_000);
  it('a segment of the label\'s range removed while quiesced (not by PostgreSQL): unquiesce fails naming it, replay resumes', async () => {
    const q = new PgQuiescer({ connection: { ...standby.connectionConfig(), application_name: 'stlabel-rm' }, role: 'standby' });
    await q.connect();
    try {
      await q.quiesce({ label: 'stlabel-rm', fast: true });
      // The label will name this restartpoint: nothing newer can be made while paused.
      const redo = (await standby.query<{ lsn: string }>('SELECT redo_lsn::text AS lsn FROM pg_control_checkpoint()'))[0]!.lsn;
      const seg = walFileName(1, parseLsn(redo), SEGMENT);
      await rm(path.join(standby.dataDir, 'pg_wal', seg)); // a careless archive cleanup pointed at pg_wal
      const e = await q.unquiesce().then(() => null, (err: unknown) => err as Error & { code?: string });
      expect(e?.code, String(e)).toBe('E_PG');
      expect(e?.message).toContain(`the standby's WAL directory lacks ${seg}`);
      expect((await standby.query<{ s: string }>('SELECT pg_get_wal_replay_pause_state() AS s'))[0]!.s).toBe('not paused');
    } finally {
      expect(await q.close()).toEqual({ released: [], failed: [] });
    }
  }, 120_000);
  it('a role that may not list the WAL directory: the window completes, a warning says the WAL was not checked', async () => {
    // What a standby's backup role needs besides: the pause, the backup, the pause state. Not pg_monitor.
    await primary.query('CREATE ROLE bs_nomon LOGIN');
    await primary.query(`GRANT EXECUTE ON FUNCTION pg_wal_replay_pause(), pg_wal_replay_resume(), pg_get_wal_replay_pause_state(),
      pg_backup_start(text, boolean), pg_backup_stop(boolean) TO bs_nomon`);
    await waitReplayed(standby, await currentLsn(primary), 60_000);
    const warnings: string[] = [];
    const logger = { warn: (_o: unknown, msg: string) => warnings.push(msg), info: () => undefined, error: () => undefined, debug: () => undefined } as unknown as Logger;
    const q = new PgQuiescer({ connection: { ...standby.connectionConfig(), user: 'bs_nomon', application_name: 'stlabel-nomon' }, role: 'standby', logger });
    await q.connect();
    try {
      await q.quiesce({ label: 'stlabel-nomon', fast: true });
      const done = await q.unquiesce();
      expect(done.labelFile).toMatch(/^LABEL: stlabel-nomon$/m);
    } finally {
      await q.close();
    }
    expect(warnings.some((w) => /cannot list the standby's WAL directory/.test(w)), warnings.join('\n')).toBe(true);
  }, 120_000);
});
