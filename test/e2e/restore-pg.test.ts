import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { PgTicker, TICK_TABLE_SQL, tickIds } from '../support/pg-ticker.js';

/**
 * A restored PostgreSQL 15 image runs: the image (taken while the ticker
 * commits) is restored onto a new file, attached and mounted, and
 * PostgreSQL starts on it (crash recovery of an atomic snapshot, DESIGN.md
 * §8.3) with every acknowledged id up to the image and no gap. Then a
 * changed-only rollback of the live volume to the same image: PostgreSQL
 * restarted on it holds exactly the image's ids.
 */
describe('restore of a PostgreSQL image', () => {
  const fx = e2eFixture();
  let lab: VolumeLab;
  let pg: PgCluster;
  let appl: ApplianceHarness;
  let agent: Agent;
  let imageId: string;
  let ackedBefore: number;
  let imageIds: { n: number; min: number; max: number };

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 512 << 20, poolSize: 2 * 1024 ** 3, name: 'pgdata' });
    pg = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
    await pg.query(TICK_TABLE_SQL);
    appl = await fx.appliance(['db1'], { auditEvery: 0 });
    agent = (await fx.agent({
      url: appl.url, name: 'db1', token: appl.tokens.db1, volumes: [lab.volume], stateDir: join(lab.root, 'agent-state'),
      postgres: { host: '127.0.0.1', port: pg.port, user: 'postgres', role: 'primary' },
    })).agent;
    const ticker = new PgTicker(pg.connectionConfig());
    await ticker.start();
    try {
      ackedBefore = await ticker.reach(200);
      const job = appl.app.router.startJob('db1', 'pgdata', 'full');
      const outcome = await job.done;
      expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
      imageId = outcome.imageId!;
      await ticker.reach(ticker.acked + 100);
    } finally {
      await ticker.stop();
    }
  });

  afterAll(() => fx.dispose());

  /** Attaches and mounts `file`, starts PostgreSQL on its data directory; all released at dispose. */
  async function startOn(file: string, name: string): Promise<PgCluster> {
    const dev = await attachLoop(file);
    fx.defer(`detach ${dev}`, () => detachLoop(dev, { backingFile: file }));
    const mnt = join(lab.root, name);
    await mkdir(mnt, { recursive: true });
    await execa('mount', ['-t', 'ext4', dev, mnt]);
    fx.defer(`umount ${mnt}`, () => execa('umount', [mnt]));
    // The copy of a running server: its lock file names the source's postmaster.
    await rm(join(mnt, 'pg', 'postmaster.pid'), { force: true });
    const copy = await fx.pg({ dataDir: join(mnt, 'pg') }, false);
    await copy.start();
    return copy;
  }

  it('PostgreSQL starts on a full restore and holds every acknowledged id up to the image, without a gap', async () => {
    const file = join(lab.poolMount, 'restored.raw');
    fx.defer(`remove ${file}`, () => rm(file, { force: true }));
    const r = await agent.restoreImage({ imageId, target: file, changedOnly: false, force: false });
    expect(r.chunksFetched).toBeGreaterThan(0);
    const copy = await startOn(file, 'restored');
    imageIds = await tickIds(copy);
    expect(imageIds.min).toBe(1);
    expect(imageIds.n).toBe(imageIds.max);
    expect(imageIds.max).toBeGreaterThanOrEqual(ackedBefore);
    await copy.stop();
  });

  it('a changed-only rollback of the live volume brings PostgreSQL back to the image', async () => {
    expect(imageIds, 'the previous test ran').toBeTruthy();
    const live = await tickIds(pg);
    expect(live.max).toBeGreaterThan(imageIds.max);
    await pg.stop();
    await execa('umount', [lab.volumeMount]);
    try {
      const r = await agent.restoreImage({ imageId, target: lab.volumeDevice, changedOnly: true, force: false });
      expect(r.changeSource).toBe('tracker');
      expect(r.chunksCompared).toBeLessThan(r.chunkCount / 4);
      expect(r.chunksFetched + r.holes).toBeLessThanOrEqual(r.chunksCompared);
    } finally {
      await execa('mount', [lab.volumeDevice, lab.volumeMount]);
    }
    await rm(join(lab.volumeMount, 'pg', 'postmaster.pid'), { force: true });
    await pg.start();
    expect(await tickIds(pg)).toEqual(imageIds);
  });
});
