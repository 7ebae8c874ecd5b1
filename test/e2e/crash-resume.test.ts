import { execa } from 'execa';
import { existsSync, statSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { ReflinkSnapshotProvider } from '../../agent/snapshot/reflink-snapshot-provider.js';
import { RetainingSnapshotProvider } from '../../agent/snapshot/retaining-provider.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { exportImage } from '../../appliance/ops/export-image.js';
import { applianceCmd } from '../../scripts/lab/processes.js';
import { TcpProxy } from '../support/tcp-proxy.js';
import { compareFiles } from '../support/same-bytes.js';
import { createLogger } from '../../proto/shared/log.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';

/**
 * Failures in the middle of a transfer, on real loop devices: a dropped
 * connection (the agent resumes from the appliance's durable point), kill -9
 * of the appliance (no image, the next backup works), kill -9 of the agent
 * (its restart removes the snapshot; the appliance ends the job at once).
 * The volume holds 256 MiB of random data so a transfer lasts long enough
 * to be interrupted: the cancel test needs the job still running after a few
 * CLI round trips (~0.3 s each). 384 MiB made every transfer, export and
 * comparison half as long again for nothing (a full of 256 MiB took 6.8-7.6 s
 * at load 7).
 */
const log = createLogger('test', process.env.BLOCKSNAP_LOG ?? 'warn');
const RANDOM_MIB = 256;

describe('crashes and dropped connections during a transfer', () => {
  const fx = e2eFixture();
  let lab: VolumeLab;
  let retained: string;

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 512 << 20, poolSize: 2 * 1024 ** 3, name: 'vol' });
    await execa('dd', ['if=/dev/urandom', `of=${join(lab.volumeMount, 'random.bin')}`, 'bs=1M', `count=${RANDOM_MIB}`, 'status=none']);
    await execa('sync');
    retained = join(lab.poolMount, 'retained');
  });

  afterAll(() => fx.dispose());

  async function agentConfig(url: string, token: string, tag: string) {
    const stateDir = await mkdtemp(join(lab.root, `state-${tag}-`));
    return parseAgentConfig({ appliance: url, agent: 'db1', token, stateDir, volumes: [lab.volume], retainSnapshotsDir: retained });
  }

  async function inProcessAgent(url: string, token: string, tag: string) {
    const config = await agentConfig(url, token, tag);
    const provider = new RetainingSnapshotProvider(new ReflinkSnapshotProvider({ stateDir: config.stateDir, logger: log, volumes: [lab.volume] }), retained);
    const agent = fx.add('agent', await composeAgent(config, log, { ports: { provider } }), (a) => a.stop());
    await agent.start();
    await agent.waitConnected(10_000);
    return agent;
  }

  async function expectIdentical(store: Parameters<typeof exportImage>[0], rootDigest: string, jobId: string) {
    const out = join(lab.poolMount, `${jobId}.raw`);
    await exportImage(store, rootDigest, out);
    const cmp = await compareFiles(out, join(retained, `vol_${jobId}.img`));
    await rm(out, { force: true });
    expect(cmp.identical, cmp.detail).toBe(true);
  }

  async function snapFiles(): Promise<string[]> {
    const dir = join(lab.poolMount, '.blocksnap');
    return existsSync(dir) ? (await readdir(dir)).filter((f) => f.includes('.snap')) : [];
  }

  it('resumes after a dropped connection from the durable point, and the image is identical to its snapshot', async () => {
    const appl = await fx.appliance(['db1'], { flushEveryBytes: 16 << 20 });
    const port = Number(new URL(appl.url).port);
    const proxy = fx.add('proxy', await TcpProxy.start(port), (p) => p.close());
    await inProcessAgent(`ws://127.0.0.1:${proxy.port}/v1/agent`, appl.tokens.db1!, 'resume');

    const job = appl.app.router.startJob('db1', 'vol', 'full');
    let dropped = false;
    job.on('progress', () => {
      if (!dropped) {
        dropped = true;
        proxy.dropAll();
      }
    });
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    expect(dropped).toBe(true);
    const img = appl.app.catalog.image(outcome.imageId!)!;
    expect(img.stats?.resumes).toBeGreaterThanOrEqual(1);
    // Resumed, not restarted: far less than the volume was received twice.
    expect(Number(img.stats?.bytesReceived)).toBeLessThan(1.6 * RANDOM_MIB * 1024 * 1024);
    await expectIdentical(appl.app.store, img.rootDigest, job.id);
    expect(await snapFiles()).toEqual([]);
  });

  it('an operator cancel mid-transfer ends the job, leaves no image and no snapshot; the next backup works', async () => {
    const dataDir = join(await mkdtemp(join(lab.root, 'appl-')), 'data');
    await mkdir(dataDir);
    const add = await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json']);
    const appl = await fx.applianceProcess(dataDir);
    await inProcessAgent(appl.url, add.json.token, 'cancel');
    const backup = applianceCmd(dataDir, ['backup', 'db1', 'vol', '--full', '--json']);
    let jobId = '';
    for (let i = 0; i < 200 && !jobId; i++) {
      const jobs = await applianceCmd(dataDir, ['jobs', 'list', '--json']);
      jobId = jobs.json?.find((j: any) => j.state === 'running')?.id ?? '';
      if (!jobId) await sleep(25);
    }
    expect(jobId).not.toBe('');
    const c = await applianceCmd(dataDir, ['jobs', 'cancel', jobId, '--json']);
    expect(c.exitCode, c.stderr).toBe(0);
    const first = await backup;
    expect(first.json).toMatchObject({ ok: false, errorCode: 'E_CANCELLED' });
    const again = await applianceCmd(dataDir, ['jobs', 'cancel', jobId]);
    expect(again.exitCode).toBe(1);
    expect(again.stderr).toMatch(/E_UNKNOWN_JOB/);
    expect((await applianceCmd(dataDir, ['images', 'list', '--json'])).json).toEqual([]);
    for (let i = 0; i < 100 && (await snapFiles()).length > 0; i++) await sleep(50);
    expect(await snapFiles()).toEqual([]);
    let next;
    for (let i = 0; i < 50; i++) {
      next = await applianceCmd(dataDir, ['backup', 'db1', 'vol', '--full', '--json']);
      if (next.json?.errorCode !== 'E_BUSY') break;
      await sleep(100);
    }
    expect(next!.json, next!.stderr).toMatchObject({ ok: true });
  });

  it('kill -9 of the appliance mid-ingest leaves no image, and the next backup works', async () => {
    const dataDir = join(await mkdtemp(join(lab.root, 'appl-')), 'data');
    await mkdir(dataDir);
    const add = await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json']);
    expect(add.exitCode, add.stderr).toBe(0);
    let appl = await fx.applianceProcess(dataDir);
    const agent = await inProcessAgent(appl.url, add.json.token, 'kill-appliance');

    const backup = applianceCmd(dataDir, ['backup', 'db1', 'vol', '--full', '--json']);
    // Kill it while a pack is being written (a temp pack of at least 2 MiB exists).
    const tmp = join(dataDir, 'store', 'tmp');
    let halfPack = false;
    for (let i = 0; i < 2000 && !halfPack; i++) {
      halfPack = existsSync(tmp) && (await readdir(tmp)).some((f) => statSync(join(tmp, f), { throwIfNoEntry: false })?.size! >= 2 << 20);
      if (!halfPack) await sleep(5);
    }
    await appl.kill9();
    expect(halfPack).toBe(true);
    const first = await backup;
    expect(first.exitCode, first.stdout + first.stderr).not.toBe(0);

    appl = await fx.applianceProcess(dataDir, { port: appl.port });
    const images = await applianceCmd(dataDir, ['images', 'list', '--json']);
    expect(images.json).toEqual([]);
    const jobs = await applianceCmd(dataDir, ['jobs', 'list', '--json']);
    expect(jobs.json[0]).toMatchObject({ state: 'failed', errorCode: 'E_INTERRUPTED' });
    expect(await readdir(join(dataDir, 'store', 'tmp'))).toEqual([]);

    await agent.waitConnected(15_000);
    let second;
    for (let i = 0; i < 50; i++) {
      // The agent's interrupted runner gives up once the new appliance says the job is unknown.
      second = await applianceCmd(dataDir, ['backup', 'db1', 'vol', '--full', '--json']);
      if (second.json?.errorCode !== 'E_BUSY' && second.json?.errorCode !== 'E_NOT_FOUND') break;
      await sleep(200);
    }
    expect(second!.json, second!.stderr).toMatchObject({ ok: true });
    const verify = await applianceCmd(dataDir, ['verify', second!.json.imageId]);
    expect(verify.exitCode, verify.stdout + verify.stderr).toBe(0);
    expect(await snapFiles()).toEqual([]);
  });

  it('kill -9 of the agent mid-transfer: its restart removes the snapshot and the appliance ends the job', async () => {
    const appl = await fx.appliance(['db1']);
    const config = await agentConfig(appl.url, appl.tokens.db1!, 'kill-agent');
    const configFile = join(config.stateDir, 'agent.json');
    await writeFile(configFile, JSON.stringify(config));
    let agent = fx.agentProcess(configFile, join(config.stateDir, 'agent.log'));
    await waitFor('the agent to connect', () => appl.app.router.connectedAgents().length > 0, { timeoutMs: 10_000, everyMs: 100 });

    const job = appl.app.router.startJob('db1', 'vol', 'full');
    await new Promise<void>((resolve) => job.once('progress', () => resolve()));
    await agent.kill9();
    expect((await snapFiles()).length).toBe(1);

    agent = fx.agentProcess(configFile, join(config.stateDir, 'agent.log'));
    const outcome = await job.done;
    expect(outcome).toMatchObject({ ok: false, errorCode: 'E_DISCONNECTED' });
    expect(appl.app.catalog.listImages()).toEqual([]);
    // The restarted agent released the snapshot its killed predecessor left.
    for (let i = 0; i < 100 && (await snapFiles()).length > 0; i++) await sleep(100);
    expect(await snapFiles()).toEqual([]);

    const next = appl.app.router.startJob('db1', 'vol', 'full');
    const ok = await next.done;
    expect(ok, JSON.stringify(ok)).toMatchObject({ ok: true });
    await expectIdentical(appl.app.store, appl.app.catalog.image(ok.imageId!)!.rootDigest, next.id);
  });
});

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
