import { execFile } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { tempDirEach } from '../support/temp-dir.js';

/*
 * Start-up cost (issue 8): config.ts needs only the registry's names, so
 * reading the configuration must not load the implementations (each entry of
 * agent/compose.ts imports its own when composed). Checked on the compiled
 * code (`npm run build`), in a child node whose module loader records every
 * URL it loads. BSN_LAZY_DIST points it at another build (e.g. one from before
 * the split, where these tests fail).
 */
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const dist = process.env.BSN_LAZY_DIST ?? path.join(repo, 'dist');
const run = promisify(execFile);

/** Records every module URL the child loads into the file $LOADLOG. */
const HOOK = `import { register } from 'node:module';
register('data:text/javascript,' + encodeURIComponent(\`
import { appendFileSync } from 'node:fs';
export async function load(url, ctx, next) { appendFileSync(process.env.LOADLOG, url + '\\\\n'); return next(url, ctx); }
\`));
`;

/** What composing the named entries needs, and nothing a lighter command should pay for. */
const HEAVY = [
  /\/node_modules\/execa\//, /\/node_modules\/pg\//, /\/node_modules\/ws\//,
  /\/agent\/agent\.js$/, /\/agent\/snapshot\//, /\/agent\/cbt\//, /\/agent\/pg\//, /\/agent\/mount\/nbd-local-mounter\.js$/,
];
const heavyIn = (urls: string[]) => urls.filter((u) => HEAVY.some((re) => re.test(u)));

describe('agent start-up: reading the config loads no implementation', () => {
  const tmp = tempDirEach('bsn-compose-lazy-');

  /** Runs `node --import hook args` in `cwd`; returns the URLs it loaded and its exit code. */
  async function loads(args: string[]): Promise<{ urls: string[]; code: number; stderr: string }> {
    const hook = path.join(tmp.path, 'hook.mjs');
    const log = path.join(tmp.path, 'loads.txt');
    await writeFile(hook, HOOK);
    await writeFile(log, '');
    let code = 0;
    let stderr = '';
    try {
      ({ stderr } = await run(process.execPath, ['--import', pathToFileURL(hook).href, ...args], { cwd: repo, env: { ...process.env, LOADLOG: log }, timeout: 60_000 }));
    } catch (e) {
      const err = e as { code?: number; stderr?: string };
      if (typeof err.code !== 'number') throw e;
      code = err.code;
      stderr = err.stderr ?? '';
    }
    return { urls: (await readFile(log, 'utf8')).split('\n').filter(Boolean), code, stderr };
  }

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
    const script = `const { loadAgentConfig } = await import(${JSON.stringify(pathToFileURL(path.join(dist, 'agent/config.js')).href)});
      const c = loadAgentConfig(${JSON.stringify(file)}); if (c.provider !== 'lvm-thin') process.exit(9);`;
    const r = await loads(['--input-type=module', '-e', script]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.urls.some((u) => u.endsWith('/agent/config.js'))).toBe(true);
    expect(heavyIn(r.urls)).toEqual([]);
  });

  it('`blocksnap-agent status --config` loads none of them either', async () => {
    const r = await loads([path.join(dist, 'agent/cli.js'), 'status', '--config', await configFile()]);
    expect(r.stderr).toMatch(/E_NOT_FOUND: no agent running/); // read the config, then found no agent
    expect(heavyIn(r.urls)).toEqual([]);
  });

  it('composing loads the entries the config names, not the others', async () => {
    const file = await configFile({ tracking: 'off' });
    const script = `const { loadAgentConfig } = await import(${JSON.stringify(pathToFileURL(path.join(dist, 'agent/config.js')).href)});
      const { agentPorts } = await import(${JSON.stringify(pathToFileURL(path.join(dist, 'agent/compose.js')).href)});
      const { pino } = await import('pino');
      const ports = await agentPorts(loadAgentConfig(${JSON.stringify(file)}), pino({ level: 'silent' }));
      if (ports.tracker !== null || ports.quiescer !== null || typeof ports.provider.create !== 'function') process.exit(9);`;
    const r = await loads(['--input-type=module', '-e', script]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.urls.some((u) => u.endsWith('/agent/snapshot/reflink-snapshot-provider.js'))).toBe(true);
    const others = r.urls.filter((u) => /\/agent\/snapshot\/lvm\/|\/agent\/cbt\/(tracefs|thin-delta|dm-era)\/|\/agent\/pg\/pg-quiescer\.js$/.test(u));
    expect(others).toEqual([]);
  });
});
