import { execa } from 'execa';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { ReflinkSnapshotProvider } from '../../agent/snapshot/reflink-snapshot-provider.js';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { createLogger } from '../../proto/shared/log.js';

/**
 * wss:// between agent and appliance with a certificate the agent must
 * verify: with the right CA a backup runs; without it (or against a plain
 * ws:// URL) the agent never connects and nothing is exchanged.
 */
const log = createLogger('test', process.env.BLOCKSNAP_LOG ?? 'silent');

describe('TLS between agent and appliance', () => {
  let dir: string;
  let lab: VolumeLab;
  let appl: ApplianceHarness;
  const agents: Agent[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'bsn-tls-'));
    // A throwaway CA-less self-signed certificate for 127.0.0.1.
    await execa('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
      '-subj', '/CN=blocksnap-test', '-addext', 'subjectAltName=IP:127.0.0.1',
      '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
    ]);
    appl = await startAppliance(['db1'], { tls: { cert: await readFile(join(dir, 'cert.pem')), key: await readFile(join(dir, 'key.pem')) } });
    lab = await createVolumeLab({ volumeSize: 64 << 20, poolSize: 512 << 20, name: 'vol' });
  });

  afterAll(async () => {
    for (const a of agents) await a.stop().catch(() => undefined);
    await appl?.close();
    await lab?.destroy();
    await rm(dir, { recursive: true, force: true });
  });

  async function agent(url: string, caFile?: string): Promise<Agent> {
    const stateDir = join(lab.root, `state-${agents.length}`);
    await mkdir(stateDir, { recursive: true });
    const config = parseAgentConfig({
      appliance: url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes: [lab.volume], tracking: 'off',
      reconnectMaxMs: 200, ...(caFile ? { caFile } : {}),
    });
    const a = composeAgent(config, log);
    agents.push(a);
    await a.start();
    return a;
  }

  it('serves wss:// and a backup runs when the agent trusts the certificate', async () => {
    expect(appl.url).toMatch(/^wss:\/\/127\.0\.0\.1:\d+\/v1\/agent$/);
    const a = await agent(appl.url, join(dir, 'cert.pem'));
    await a.waitConnected(10_000);
    const job = appl.app.router.startJob('db1', 'vol', 'full');
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    await a.stop();
  });

  it('an agent that cannot verify the certificate never connects, nor does a plain ws:// client', async () => {
    const untrusting = await agent(appl.url);
    const plain = await agent(appl.url.replace('wss://', 'ws://'));
    await new Promise((r) => setTimeout(r, 1500));
    expect(untrusting.connected).toBe(false);
    expect(plain.connected).toBe(false);
    expect(appl.app.router.connectedAgents()).toEqual([]);
  });

  it('refuses a caFile that does not exist, at config time', () => {
    expect(() => parseAgentConfig({
      appliance: appl.url, agent: 'db1', token: 't', stateDir: '/tmp', volumes: [], caFile: join(dir, 'nope.pem'),
    })).toThrow(/cannot read caFile/);
  });
});
