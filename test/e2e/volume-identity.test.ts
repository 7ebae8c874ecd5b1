import { execa } from 'execa';
import { mkdir, open, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { snapshotDirOf } from '../../agent/snapshot/reflink-snapshot-provider.js';
import type { VolumeSpec } from '../../agent/snapshot/snapshot-provider.js';
import { findMount } from '../../agent/snapshot/fsfreeze.js';
import { startTestAgent } from '../support/pg-agent.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { spawnAgent } from '../../scripts/lab/processes.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { createLogger } from '../../proto/shared/log.js';
import { createLoopRig, ownInstances, type LoopRig } from '../agent/tracker-fixtures.js';
import { e2eFixture } from '../support/e2e-fixture.js';

/**
 * Volume identity end to end (DESIGN.md §7.3), real appliance and agent over
 * a WebSocket, real loop devices, XFS reflink pool and ext4. A configuration
 * whose device, image and mountpoint are not one volume is refused when the
 * agent starts (before any tracker starts) and, when it starts lying on a
 * running agent, before the job quiesces or snapshots anything: the job
 * fails E_IDENTITY, no snapshot and no image is left, and the tracker is
 * untouched (the next true job is a tracker incremental).
 */
const MiB = 1024 * 1024;
const log = createLogger('test-agent', process.env.BLOCKSNAP_LOG ?? 'warn');

describe('volume identity: agent start and every job refuse a configuration that is not one volume', () => {
  let a: VolumeLab;
  let b: VolumeLab;
  let small: LoopRig;
  let twin: string;
  let appl: ApplianceHarness;
  let overmounted = false;
  const fx = e2eFixture();

  beforeAll(async () => {
    a = await fx.lab({ name: 'vol', volumeSize: 256 * MiB });
    b = await fx.lab({ name: 'other', volumeSize: 256 * MiB });
    small = fx.add('small loop rig', await createLoopRig(128 * MiB), (r) => r.release());
    // Another file of the same size in the same reflink pool: the old agent cloned it happily.
    twin = join(a.poolMount, 'twin.img');
    fx.defer('twin image', () => rm(twin, { force: true }));
    const fh = await open(twin, 'wx', 0o600);
    await fh.truncate(256 * MiB);
    await fh.close();
    appl = await fx.appliance(['db1']);
    fx.defer('the mount over the volume', () => overmounted ? execa('umount', [a.volumeMount], { reject: false }) : undefined);
  }, 120_000);

  afterAll(() => fx.dispose());

  async function noSnapshots(): Promise<void> {
    for (const image of [a.volumeImage, b.volumeImage]) {
      expect((await readdir(snapshotDirOf(image)).catch(() => [] as string[])).filter((n) => n.includes('.snap'))).toEqual([]);
    }
  }

  const startLies: Array<[string, Partial<VolumeSpec>, RegExp]> = [
    ['image is another file of the same size', {}, /image: configured .*twin\.img/],
    ['device is another loop device of the same size', {}, /image: configured .*vol\.img.*found \/dev\/loop\d+ \(\d+:\d+\) is backed by another file/],
    ['device has another size', {}, /size: configured image .*vol\.img: 268435456 bytes, found device \/dev\/loop\d+ \(\d+:\d+\): 134217728 bytes/],
    ['mountpoint holds another device\'s filesystem', {}, /mountpoint: configured .*\/vol on \/dev\/loop\d+.*found the ext4 filesystem of \/dev\/loop\d+/],
  ];

  it.each(startLies.map(([what], i) => [what, i] as const))('refuses to start when the %s', async (what, i) => {
    const lie: Partial<VolumeSpec> = [{ image: twin }, { device: b.volumeDevice }, { device: small.device }, { mountpoint: b.volumeMount }][i]!;
    const stateDir = join(a.root, `state-start-${i}`);
    const err = await startTestAgent({
      url: appl.url, name: 'db1', token: appl.tokens.db1!, volumes: [{ ...a.volume, ...lie }], stateDir, log,
    }).then(async (t) => {
      await t.agent.stop(); // started on a lie: release it before failing
      return null;
    }, (e: unknown) => e);
    expect(isBlocksnapError(err, 'E_IDENTITY'), `${what}: ${String(err)}`).toBe(true);
    expect((err as Error).message).toMatch(startLies[i]![2]);
    expect((err as Error).message).not.toMatch(/readChunks|words/);
    // Refused before any tracker started: no tracing instance of this process, no snapshot.
    expect(await ownInstances()).toEqual([]);
    await noSnapshots();
  });

  it('blocksnap-agent run on a lying config exits 2 with the E_IDENTITY message', async () => {
    const dir = join(a.root, 'cli');
    await mkdir(dir, { recursive: true });
    const configFile = join(dir, 'agent.json');
    await writeFile(configFile, JSON.stringify({
      appliance: appl.url, agent: 'db1', token: appl.tokens.db1!, stateDir: join(dir, 'state'), tracking: 'tracefs',
      volumes: [{ ...a.volume, image: twin }],
    }));
    const agent = spawnAgent(configFile, join(dir, 'agent.log'));
    const deadline = setTimeout(() => void agent.kill9(), 60_000);
    const code = await agent.exited.finally(() => clearTimeout(deadline));
    expect(code, await readFile(join(dir, 'agent.log'), 'utf8')).toBe(2);
    const stderr = await readFile(join(dir, 'agent.log'), 'utf8');
    expect(stderr).toMatch(/E_IDENTITY: volume vol is not one volume: image: configured .*twin\.img/);
    await noSnapshots();
  });

  it('a running agent whose configuration starts lying fails those jobs cleanly and backs up again once it is true', async () => {
    const stateDir = join(a.root, 'state-running');
    const { agent } = await startTestAgent({ url: appl.url, name: 'db1', token: appl.tokens.db1!, volumes: [a.volume], stateDir, log });
    try {
      await runningAgent(agent);
    } finally {
      await agent.stop();
    }
  });

  async function backup(mode: 'full' | 'incremental') {
    const job = appl.app.router.startJob('db1', 'vol', mode);
    return { ...(await job.done), jobId: job.id };
  }

  async function runningAgent(agent: Agent): Promise<void> {
    const full = await backup('full');
    expect(full, JSON.stringify(full)).toMatchObject({ ok: true });
    const images = () => appl.app.catalog.listImages({ agent: 'db1', volume: 'vol' }).length;
    const before = images();

    const volume = agent.config.volumes.find((v) => v.name === 'vol')!;
    const truth = { ...volume };
    const lies: Array<[Partial<VolumeSpec>, RegExp]> = [
      [{ image: twin }, /image: configured .*twin\.img/],
      [{ device: b.volumeDevice }, /is backed by another file/],
      [{ device: small.device }, /size: configured image/],
    ];
    for (const [lie, message] of lies) {
      Object.assign(volume, lie);
      try {
        await writeFile(join(a.volumeMount, 'between-jobs'), `lie ${JSON.stringify(lie)}`);
        const r = await backup('incremental');
        expect(r, JSON.stringify(r)).toMatchObject({ ok: false, errorCode: 'E_IDENTITY' });
        expect(r.errorMessage).toMatch(message);
      } finally {
        Object.assign(volume, truth);
      }
      await noSnapshots();
      expect(images()).toBe(before);
    }

    // The filesystem at the mountpoint replaced by another device's (mounted over it).
    await execa('mount', ['-t', 'ext4', '-o', 'noatime', b.volumeDevice, a.volumeMount]);
    overmounted = true;
    try {
      expect((await findMount(a.volumeMount))?.source).toBe(b.volumeDevice);
      const r = await backup('incremental');
      expect(r, JSON.stringify(r)).toMatchObject({ ok: false, errorCode: 'E_IDENTITY' });
      expect(r.errorMessage).toMatch(/mountpoint: configured .* found the ext4 filesystem of \/dev\/loop\d+/);
    } finally {
      await execa('umount', [a.volumeMount]);
      overmounted = false;
    }
    await noSnapshots();

    // True again: the refused jobs held nothing and disturbed no tracker generation.
    await writeFile(join(a.volumeMount, 'after-lies'), 'true again');
    const inc = await backup('incremental');
    expect(inc, JSON.stringify(inc)).toMatchObject({ ok: true });
    const stats = appl.app.catalog.job(inc.jobId)!.stats as Record<string, unknown>;
    expect(stats.changeSource, JSON.stringify(stats)).toBe('tracker');
    await noSnapshots();
  }
});
