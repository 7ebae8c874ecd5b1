/**
 * The agent's ports are seams: a JobRunner composed of the fake snapshot
 * provider, the fake quiescer and the memory tracker — no loop device, no
 * kernel tracing, no PostgreSQL — runs real jobs against a real in-process
 * appliance over a real WebSocket. The full and the tracker incremental it
 * commits read back equal to the fake volume's bytes at each snapshot, and
 * each image carries the fake quiescer's backup label.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryTracker } from '../../agent/cbt/testing/memory-tracker.js';
import { VolumeTracking } from '../../agent/cbt/volume-tracking.js';
import { JobRunner } from '../../agent/job-runner.js';
import { FakeDatabase, FakeQuiescer } from '../../agent/pg/testing/fake-quiescer.js';
import { FakeSnapshotProvider, FakeVolume } from '../../agent/snapshot/testing/fake-snapshot-provider.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { imageBytes } from '../../appliance/testing/scripted-agent.js';
import { readManifest } from '../../appliance/store/manifest.js';
import { BlocksnapError } from '../../proto/errors.js';
import { createLogger } from '../../proto/shared/log.js';
import { envelope, PROTOCOL_VERSION, type Envelope } from '../../proto/messages.js';
import { ScramClient } from '../../proto/scram.js';
import type { Transport } from '../../proto/transport.js';
import { connectWs } from '../../proto/ws-transport.js';

const MiB = 1024 * 1024;
const CHUNK = 65536;
const log = createLogger('test-fake-ports', process.env.BLOCKSNAP_LOG ?? 'warn');

/**
 * The agent's session, reduced to what a JobRunner needs: SCRAM handshake,
 * Hello with the volume, runJob starts a runner, job frames go to it.
 */
async function session(url: string, token: string, volume: FakeVolume, newRunner: (env: Extract<Envelope, { kind: 'runJob' }>) => JobRunner): Promise<Transport> {
  const t = await connectWs(url);
  const runners = new Map<string, JobRunner>();
  const scram = new ScramClient('db1', token, PROTOCOL_VERSION, new Map());
  let up = false;
  const welcome = new Promise<void>((resolve, reject) => {
    t.onClose((err) => reject(err ?? new BlocksnapError('E_DISCONNECTED', 'closed during handshake')));
    t.onMessage((env) => {
      if (env.kind === 'authChallenge') {
        scram.proof(env.authChallenge).then((p) => t.send(envelope('authProof', p))).catch(reject);
      } else if (env.kind === 'welcome') {
        scram.checkWelcome(env.welcome);
        up = true;
        resolve();
      } else if (env.kind === 'runJob') {
        const r = newRunner(env);
        runners.set(env.runJob.jobId, r);
        void r.run().finally(() => runners.delete(env.runJob.jobId));
      } else if (env.kind === 'ping') {
        void t.send(envelope('pong', env.ping)).catch(() => undefined);
      } else if (up && 'jobId' in (env as any)[env.kind]) {
        runners.get((env as any)[env.kind].jobId)?.deliver(env);
      }
    });
  });
  await t.send(envelope('hello', {
    agent: 'db1', clientNonce: scram.clientNonce, protocolVersion: PROTOCOL_VERSION, agentVersion: 'test', instanceId: randomBytes(8).toString('hex'),
    volumes: [{ name: volume.spec.name, size: volume.bytes.length, chunkSize: volume.spec.chunkSize, lastImageId: '' }], groups: [],
  }));
  await welcome;
  return t;
}

describe('fake provider + fake quiescer + memory tracker, real appliance', () => {
  let appl: ApplianceHarness;
  let dir: string;
  let transport: Transport | undefined;
  let tracking: VolumeTracking | undefined;
  const volume = new FakeVolume('fakevol', 16 * MiB, { chunkSize: CHUNK });
  const db = new FakeDatabase('primary');
  const fx = e2eFixture();

  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-fake-ports-'));
    fx.defer('test directory', () => rm(dir, { recursive: true, force: true }));
    appl = await fx.appliance(['db1']);
    for (let i = 0; i < 64; i += 3) volume.write(i * CHUNK + 100, randomBytes(CHUNK / 2));
    const stateDir = path.join(dir, 'state');
    tracking = fx.add('tracking', await VolumeTracking.open(volume.spec, stateDir, new MemoryTracker([volume.device]), log), (t) => t.close());
    const provider = new FakeSnapshotProvider(path.join(dir, 'snapshots'), [volume]);
    transport = await session(appl.url, appl.tokens.db1!, volume, (env) => new JobRunner({
      stateDir, provider, log, windowBytes: 8 * MiB, batchBytes: MiB, workers: 2,
      send: (e) => transport!.send(e), waitConnected: async () => undefined, resumeTimeoutMs: 10_000, replyTimeoutMs: 30_000,
      trackingOf: (name) => (name === volume.spec.name ? tracking : undefined),
      quiescer: () => new FakeQuiescer(db, { role: 'primary' }),
    }, env.runJob, volume.spec));
    fx.defer('transport', () => transport?.close());
  });

  afterAll(() => fx.dispose());

  async function backup(mode: 'full' | 'incremental') {
    const expected = Buffer.from(volume.bytes); // nothing writes while the job runs
    const job = appl.app.router.startJob('db1', volume.spec.name, mode);
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    const image = outcome.imageId!;
    expect((await imageBytes(appl, image)).equals(expected)).toBe(true);
    const manifest = await readManifest(path.join(appl.dataDir, 'store'), image);
    expect(manifest.pg?.labelFile).toContain(`\nLABEL: blocksnap ${job.id}\n`);
    return { jobId: job.id, image, stats: appl.app.catalog.job(job.id)!.stats as Record<string, unknown> };
  }

  it('commits a full and a tracker incremental that read back equal to the fake volume; the quiescer held and released each window', async () => {
    await backup('full');
    const changed = [5, 17, 40, 255];
    for (const c of changed) volume.write(c * CHUNK + 512, randomBytes(1024));
    const inc = await backup('incremental');
    expect(inc.stats).toMatchObject({ changeSource: 'tracker', chunksRead: changed.length, chunksSent: changed.length });
    expect(db.completed.map((r) => r.labelFile!.match(/LABEL: (.*)\n/)![1])).toEqual([expect.stringMatching(/^blocksnap /), expect.stringMatching(/^blocksnap /)]);
    expect(db.held.size).toBe(0);
    expect(tracking!.validity()).toEqual({ valid: true });
  });
});
