import { execa } from 'execa';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import pino from 'pino';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { createLogger } from '../../proto/shared/log.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';

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
  let agents = 0;
  const fx = e2eFixture();

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'bsn-tls-'));
    fx.defer('test directory', () => rm(dir, { recursive: true, force: true }));
    // A throwaway CA-less self-signed certificate for 127.0.0.1.
    await execa('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
      '-subj', '/CN=blocksnap-test', '-addext', 'subjectAltName=IP:127.0.0.1',
      '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
    ]);
    appl = await fx.appliance(['db1'], { tls: { cert: await readFile(join(dir, 'cert.pem')), key: await readFile(join(dir, 'key.pem')) } });
    lab = await fx.lab({ volumeSize: 64 << 20, poolSize: 512 << 20, name: 'vol' });
  });

  afterAll(() => fx.dispose());

  async function agent(url: string, caFile?: string, logger = log): Promise<Agent> {
    const stateDir = join(lab.root, `state-${agents++}`);
    await mkdir(stateDir, { recursive: true });
    const config = parseAgentConfig({
      appliance: url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes: [lab.volume], tracking: 'off',
      reconnectMaxMs: 200, ...(caFile ? { caFile } : {}),
    });
    const a = fx.add('agent', await composeAgent(config, logger), (x) => x.stop());
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
    // Each agent's log: "never connects" is asserted once each has seen its dials fail, not after a fixed wait.
    const logs = { untrusting: [] as string[], plain: [] as string[] };
    const logTo = (lines: string[]) => pino({ level: 'warn' }, { write: (s: string) => void lines.push(s) });
    const untrusting = await agent(appl.url, undefined, logTo(logs.untrusting));
    const plain = await agent(appl.url.replace('wss://', 'ws://'), undefined, logTo(logs.plain));
    const failedDials = (lines: string[]) => lines.filter((l) => l.includes('"msg":"cannot reach appliance"')).length;
    const refused = (lines: string[]) => lines.some((l) => /"level":50/.test(l));
    for (const [name, lines] of Object.entries(logs)) {
      await waitFor(`the ${name} agent's dials to fail`, () => failedDials(lines) >= 3 || refused(lines), { timeoutMs: 15_000, detail: () => lines.join('') });
    }
    expect(logs.untrusting.join('')).toMatch(/certificate/i);
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
