/**
 * Application-consistent images of a STANDBY through the product: a primary
 * in a plain directory, a streaming standby whose data directory is on a
 * file-backed volume, an in-process appliance and an agent configured with
 * `postgres.role = 'standby'` pointing at the standby. On 15 (standby made by
 * pg_basebackup) and on the newest version the lab finds (standby made from
 * a backup copy + prepare --as-standby):
 *   - the job pauses replay around the snapshot and resumes it; the image says
 *     role standby and its replay LSN covers everything the standby had
 *     replayed before the job; restored (export + prepare + start) it reaches
 *     consistency with every id the primary acknowledged and the standby
 *     replayed before the job, no gap, checksums clean;
 *   - bad input: an agent that expects a primary fails E_PG, one whose pause
 *     never completes (a standby query holds a lock replay needs) fails
 *     E_TIMEOUT; either way replay runs again, no session is left open and no
 *     snapshot is left in <pool>/.blocksnap.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLsn } from '../../agent/pg/sql-table.js';
import { findPgServers, type PgServerBuild } from '../../scripts/lab/version-lab.js';
import { checkChecksums } from '../support/pg-checksums.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { restoreImage } from '../support/pg-image-restore.js';
import { currentLsn, replayPauseState, waitReplayed } from '../../scripts/lab/pg-standby.js';
import { PgTicker, tickIds } from '../support/pg-ticker.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import type { JobOutcome } from '../../appliance/server/active-job.js';
import type { PgImageInfo } from '../../appliance/store/pg-image-info.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { blocksnapSessions, setUpPgVersion } from '../support/pg-version-setup.js';
import { waitFor } from '../support/wait-for.js';

const builds = await findPgServers();
const newest = builds.filter((b) => b.versionNum >= 160000).at(-1);
const standbyBuilds = [builds.find((b) => b.major === '15'), newest].filter((b): b is PgServerBuild => !!b);
const names = (b: PgServerBuild) => ({ main: `sb${b.major}`, wrong: `sb${b.major}-wrong`, stuck: `sb${b.major}-stuck` });

const listOrEmpty = (dir: string) => readdir(dir).catch(() => [] as string[]);

const shared = e2eFixture();
let appl: ApplianceHarness;
beforeAll(async () => {
  appl = await shared.appliance(standbyBuilds.flatMap((b) => Object.values(names(b))));
});
afterAll(() => shared.dispose());

it('the lab has PostgreSQL 15 and a newer version for standbys', () => {
  if (!process.env.BLOCKSNAP_PG_VERSIONS) expect(standbyBuilds.map((b) => b.major)).toEqual(['15', newest?.major]);
  expect(standbyBuilds.length).toBeGreaterThan(0);
});

describe.each(standbyBuilds)('standby image through the product, PostgreSQL $version', (b) => {
  const n = names(b);
  const fx = e2eFixture();
  let lab: VolumeLab | undefined;
  let primary: PgCluster | undefined;
  let standby: PgCluster | undefined;
  const snapDir = () => join(lab!.poolMount, '.blocksnap');
  const agentFor = (name: string, stateDir: string, postgres: Record<string, unknown>) => fx.pgAgent({
    url: appl.url, name, token: appl.tokens[name]!, volume: lab!.volume, stateDir: join(lab!.root, stateDir),
    postgres: { host: '127.0.0.1', port: standby!.port, user: 'postgres', ...postgres },
  });

  beforeAll(async () => {
    ({ lab, primary, standby } = await setUpPgVersion(fx, {
      build: b, appl, agent: n.main, role: 'standby', primarySql: ['CREATE TABLE t (id int)'],
      // max_standby_streaming_delay -1: a conflicting standby query blocks replay for good (the "never pauses" case).
      standbySettings: { max_standby_streaming_delay: '-1', hot_standby_feedback: 'off' },
    }));
  });

  afterAll(() => fx.dispose());

  it('pauses replay around the snapshot and resumes it; the restored image has every id the standby had replayed, no gap, clean checksums', async () => {
    const ticker = new PgTicker(primary!.connectionConfig());
    await ticker.start();
    let outcome: JobOutcome, ackedReplayed: number, replayedLsn: string, jobId: string;
    try {
      await ticker.reach(50);
      // Ids acknowledged before the LSN is read are below it; once the standby replayed past it, they are on the standby.
      ackedReplayed = ticker.acked;
      replayedLsn = await waitReplayed(standby!, await currentLsn(primary!));
      const job = appl.app.router.startJob(n.main, 'pgdata', 'full');
      jobId = job.id;
      outcome = await job.done;
      await ticker.reach(ticker.acked + 5);
    } finally {
      await ticker.stop();
    }
    expect(ticker.error).toBeNull();
    expect(outcome!, JSON.stringify(outcome!)).toMatchObject({ ok: true });

    // Replay runs again: paused state cleared, and the standby follows the primary to its end.
    expect(await replayPauseState(standby!, b.versionNum)).toBe('not paused');
    await waitReplayed(standby!, await currentLsn(primary!));
    expect(await blocksnapSessions(standby!)).toBe(0);
    expect(await listOrEmpty(snapDir())).toEqual([]);
    expect(await listOrEmpty(join(lab!.root, 'agent-state', 'pg', 'pg-quiesce'))).toEqual([]);

    const img = appl.app.catalog.image(outcome!.imageId!)!;
    const info = img.pg as unknown as PgImageInfo;
    expect(info).toMatchObject({ role: 'standby', serverVersion: b.versionNum, exclusive: false, wal: [] });
    expect(info.replayLsn).toMatch(/^[0-9A-F]+\/[0-9A-F]+$/);
    expect(parseLsn(info.replayLsn) >= parseLsn(replayedLsn!)).toBe(true);
    // The stop point (the standby's minRecoveryPoint) is never past what the snapshot holds.
    expect(parseLsn(info.stopLsn) <= parseLsn(info.replayLsn)).toBe(true);
    expect(info.labelFile).toContain('\nBACKUP FROM: standby\n');
    expect(info.labelFile).toContain(`\nLABEL: blocksnap ${jobId!}\n`);
    expect(info.pausedSeconds).toBeGreaterThan(0);

    const r = await restoreImage({
      store: appl.app.store, imageId: img.id, rootDigest: img.rootDigest, pg: info, exportDir: lab!.poolMount,
      mountBase: lab!.root, name: 'restored', dataSubdir: 'pg', binDir: b.binDir,
    });
    fx.add('restore', r, (x) => x.release());
    expect(await r.log()).toMatch(/consistent recovery state reached/);
    const got = await tickIds(r.cluster);
    expect(got.min).toBe(1);
    expect(got.n).toBe(got.max); // contiguous
    expect(got.max, `replayed before the job: ${ackedReplayed!} (to ${replayedLsn!}); image stop ${info.stopLsn}, replay ${info.replayLsn}`).toBeGreaterThanOrEqual(ackedReplayed!);
    const check = await checkChecksums(r.cluster, b.versionNum);
    expect(check.ok, check.output).toBe(true);
    expect(check.blocks).toBeGreaterThan(100);
  });

  it('an agent that expects a primary: E_PG, replay untouched, nothing open, no snapshot', async () => {
    const wrong = await agentFor(n.wrong, 'agent-state-wrong', { role: 'primary' });
    const outcome = await appl.app.router.startJob(n.wrong, 'pgdata', 'full').done;
    expect(outcome).toMatchObject({ ok: false, errorCode: 'E_PG' });
    expect(outcome.errorMessage).toMatch(/is a standby \(in recovery\), but it is configured as a primary/);
    expect(await replayPauseState(standby!, b.versionNum)).toBe('not paused');
    expect(await blocksnapSessions(standby!)).toBe(0);
    expect(await listOrEmpty(snapDir())).toEqual([]);
    await wrong.stop();
  });

  it('replay that never pauses within pauseTimeoutMs: E_TIMEOUT, replay resumed, nothing open, no snapshot', async () => {
    const stuck = await agentFor(n.stuck, 'agent-state-stuck', { role: 'standby', pauseTimeoutMs: 1500 });
    await waitReplayed(standby!, await currentLsn(primary!));
    // A standby query holds a lock; the primary's ACCESS EXCLUSIVE lock record then waits for it in replay, forever.
    const reader = new pg.Client(standby!.connectionConfig());
    await reader.connect();
    try {
      await reader.query('BEGIN');
      await reader.query('SELECT count(*) FROM t');
      await primary!.query('BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; COMMIT');
      const blockedAt = await currentLsn(primary!);
      // Replay is blocked once the startup process waits for the lock the reader's AccessShare holds off.
      await waitFor('replay to wait for the ACCESS EXCLUSIVE lock', async () =>
        Number((await standby!.query<{ n: string }>("SELECT count(*)::text AS n FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted"))[0]!.n) > 0,
      { timeoutMs: 10_000, everyMs: 20 });
      await expect(waitReplayed(standby!, blockedAt, 500)).rejects.toThrow(/standby replay at/);

      const t0 = Date.now();
      const outcome = await appl.app.router.startJob(n.stuck, 'pgdata', 'full').done;
      expect(outcome).toMatchObject({ ok: false, errorCode: 'E_TIMEOUT' });
      expect(outcome.errorMessage).toMatch(/replay did not pause within 1500 ms \(state pause requested/);
      expect(Date.now() - t0).toBeLessThan(15_000);
      // Resumed by blocksnap while the lock still blocks replay.
      expect(await replayPauseState(standby!, b.versionNum)).toBe('not paused');
      expect(await blocksnapSessions(standby!)).toBe(0);
      expect(await listOrEmpty(snapDir())).toEqual([]);
      expect(await listOrEmpty(join(lab!.root, 'agent-state-stuck', 'pg', 'pg-quiesce'))).toEqual([]);
    } finally {
      await reader.query('ROLLBACK').catch(() => undefined);
      await reader.end();
    }
    // Unblocked, replay goes on by itself: nothing paused it.
    await waitReplayed(standby!, await currentLsn(primary!));
    await stuck.stop();
  });
});
