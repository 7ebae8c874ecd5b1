/**
 * The agent's ports are chosen by config: a registry extended with test-only
 * entries (a fake snapshot provider, the memory tracker, a fake quiescer) and
 * an Agent composed from the config `{"provider": "fake", "tracking":
 * "memory", "quiescer": "fake"}` — the same composeAgent the CLI uses, no
 * hand-built JobRunner — backs up against a real in-process appliance over a
 * real WebSocket. The full and the tracker incremental read back equal to the
 * fake volume's bytes, each image carries the fake quiescer's label, and the
 * default registry refuses those names (E_CONFIG). The appliance side runs
 * twice: with the filesystem stores `serve` composes, and with the memory
 * chunk and manifest stores plugged into its ApplianceBackends.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { MemoryTracker } from '../../agent/cbt/testing/memory-tracker.js';
import { composeAgent, extendRegistry, namesOf, registry } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { FakeDatabase, FakeQuiescer } from '../../agent/pg/testing/fake-quiescer.js';
import { FakeSnapshotProvider, FakeVolume } from '../../agent/snapshot/testing/fake-snapshot-provider.js';
import { applianceBackends } from '../../appliance/compose.js';
import type { ApplianceBackends } from '../../appliance/server/appliance.js';
import { MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';
import { MemoryManifestStore } from '../../appliance/testing/memory-manifest-store.js';
import { imageBytes } from '../../appliance/testing/scripted-agent.js';
import { createLogger } from '../../proto/shared/log.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { e2eFixture } from '../support/e2e-fixture.js';

const MiB = 1024 * 1024;
const CHUNK = 65536;
const log = createLogger('test-fake-ports-config', process.env.BLOCKSNAP_LOG ?? 'warn');

const memoryStores = (): ApplianceBackends => ({
  ...applianceBackends(), openChunkStore: async () => new MemoryChunkStore(), openManifestStore: () => new MemoryManifestStore(),
});

for (const [stores, backends] of [['filesystem stores', undefined], ['memory stores', memoryStores()]] as const) {
  describe(`an agent composed by config from test-registered fakes, real appliance (${stores})`, () => {
    let appl: ApplianceHarness | undefined;
    let dir: string | undefined;
    let agent: Agent | undefined;
    const volume = new FakeVolume('fakevol', 16 * MiB, { chunkSize: CHUNK });
    const db = new FakeDatabase('primary');
    // One line per port, as a new provider/tracker/quiescer is added to agent/compose.ts.
    const testRegistry = extendRegistry(registry, {
      providers: { fake: ({ config }) => new FakeSnapshotProvider(path.join(config.stateDir, 'snapshots'), [volume]) },
      trackers: { memory: () => ({ kind: 'memory', cleanupStale: async () => [], create: () => new MemoryTracker([volume.device]) }) },
      quiescers: { fake: () => ({ factory: () => new FakeQuiescer(db, { role: 'primary' }), releaseStale: async () => ({ found: false, actions: [] }) }) },
    });
    const rawConfig = (url: string, token: string, stateDir: string) => ({
      appliance: url, agent: 'db1', token, stateDir, provider: 'fake', tracking: 'memory', quiescer: 'fake',
      volumes: [{ name: volume.spec.name, device: volume.spec.device, mountpoint: volume.spec.mountpoint, chunkSize: CHUNK }],
    });

    const fx = e2eFixture();

    beforeAll(async () => {
      dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-fake-config-'));
      fx.defer('test directory', () => rm(dir!, { recursive: true, force: true }));
      appl = await fx.appliance(['db1'], backends ? { backends } : {});
      for (let i = 0; i < 64; i += 3) volume.write(i * CHUNK + 100, randomBytes(CHUNK / 2));
      const config = parseAgentConfig(rawConfig(appl.url, appl.tokens.db1!, path.join(dir, 'state')), 'test', namesOf(testRegistry));
      agent = fx.add('agent', await composeAgent(config, log, { registry: testRegistry }), (a) => a.stop());
      await agent.start();
      await agent.waitConnected(10_000);
    });

    afterAll(() => fx.dispose());

    async function backup(mode: 'full' | 'incremental') {
      const expected = Buffer.from(volume.bytes); // nothing writes while the job runs
      const job = appl!.app.router.startJob('db1', volume.spec.name, mode);
      const outcome = await job.done;
      expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
      const image = outcome.imageId!;
      expect((await imageBytes(appl!, image)).equals(expected)).toBe(true);
      const manifest = await appl!.app.manifests.get(image);
      expect(manifest.pg?.labelFile).toContain(`\nLABEL: blocksnap ${job.id}\n`);
      return { stats: appl!.app.catalog.job(job.id)!.stats as Record<string, unknown> };
    }

    it('backs up a full and a tracker incremental that read back equal to the fake volume', async () => {
      expect(agent!.status()).toMatchObject({ connected: true, trackingMode: 'memory' });
      await backup('full');
      const changed = [5, 17, 40, 255];
      for (const c of changed) volume.write(c * CHUNK + 512, randomBytes(1024));
      const inc = await backup('incremental');
      expect(inc.stats).toMatchObject({ changeSource: 'tracker', chunksRead: changed.length, chunksSent: changed.length });
      expect(db.completed).toHaveLength(2);
      expect(db.held.size).toBe(0);
    });

    it('the default registry does not know the test names: E_CONFIG naming each key', () => {
      let err: unknown;
      try {
        parseAgentConfig(rawConfig('ws://127.0.0.1:1/v1/agent', 't', '/tmp/none'), 'config.json');
      } catch (e) {
        err = e;
      }
      expect(err).toMatchObject({ code: 'E_CONFIG' });
      expect((err as Error).message.split('\n')).toEqual([
        'config.json: provider: must be "reflink", "lvm-classic" or "lvm-thin"',
        'config.json: tracking: must be "tracefs", "thin-delta", "dm-era" or "off"',
        'config.json: quiescer: must be "postgres"',
      ]);
    });
  });
}
