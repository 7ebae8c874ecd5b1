import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { distDir, distUrl, loadedOf, moduleLoads } from '../support/module-loads.js';
import { tempDirEach } from '../support/temp-dir.js';

/*
 * Start-up cost (issue 8): config.ts needs only the registry's names, so
 * reading the configuration must not load the implementations (each entry of
 * agent/compose.ts imports its own when composed). Checked on the compiled
 * code (`npm run build`). On the build before the split all three fail.
 */
const HEAVY = [
  /\/node_modules\/execa\//, /\/node_modules\/pg\//, /\/node_modules\/ws\//,
  /\/agent\/agent\.js$/, /\/agent\/snapshot\//, /\/agent\/cbt\//, /\/agent\/pg\//, /\/agent\/mount\/nbd-local-mounter\.js$/,
];

describe('agent start-up: reading the config loads no implementation', () => {
  const tmp = tempDirEach('bsn-compose-lazy-');

  async function configFile(extra: object = {}): Promise<string> {
    const state = path.join(tmp.path, 'state');
    await mkdir(state);
    const file = path.join(tmp.path, 'agent.json');
    await writeFile(file, JSON.stringify({
      appliance: 'ws://127.0.0.1:1/v1/agent', agent: 'db1', token: 't', stateDir: state,
      volumes: [{ name: 'pgdata', device: '/dev/null', image: path.join(tmp.path, 'x.img'), mountpoint: tmp.path }], ...extra,
    }));
    return file;
  }

  it('importing agent/config.js and loading a config loads no execa, pg, ws, agent, provider, tracker or quiescer', async () => {
    const file = await configFile({ provider: 'lvm-thin', tracking: 'thin-delta', postgres: {} });
    const script = `const { loadAgentConfig } = await import(${JSON.stringify(distUrl('agent/config.js'))});
      const c = loadAgentConfig(${JSON.stringify(file)}); if (c.provider !== 'lvm-thin') process.exit(9);`;
    const r = await moduleLoads(tmp.path, ['--input-type=module', '-e', script]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.urls.some((u) => u.endsWith('/agent/config.js'))).toBe(true);
    expect(loadedOf(r.urls, HEAVY)).toEqual([]);
  });

  it('`blocksnap-agent status --config` loads none of them either', async () => {
    const r = await moduleLoads(tmp.path, [path.join(distDir, 'agent/cli.js'), 'status', '--config', await configFile()]);
    expect(r.stderr).toMatch(/E_NOT_FOUND: no agent running/); // read the config, then found no agent
    expect(loadedOf(r.urls, HEAVY)).toEqual([]);
  });

  it('composing loads the entries the config names, not the others', async () => {
    const file = await configFile({ tracking: 'off' });
    const script = `const { loadAgentConfig } = await import(${JSON.stringify(distUrl('agent/config.js'))});
      const { agentPorts } = await import(${JSON.stringify(distUrl('agent/compose.js'))});
      const { pino } = await import('pino');
      const ports = await agentPorts(loadAgentConfig(${JSON.stringify(file)}), pino({ level: 'silent' }));
      if (ports.tracker !== null || ports.quiescer !== null || typeof ports.provider.create !== 'function') process.exit(9);`;
    const r = await moduleLoads(tmp.path, ['--input-type=module', '-e', script]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.urls.some((u) => u.endsWith('/agent/snapshot/reflink-snapshot-provider.js'))).toBe(true);
    expect(loadedOf(r.urls, [/\/agent\/snapshot\/lvm\//, /\/agent\/cbt\/(tracefs|thin-delta|dm-era)\//, /\/agent\/pg\/pg-quiescer\.js$/])).toEqual([]);
  });
});
