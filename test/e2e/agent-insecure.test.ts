import { execa } from 'execa';
import { spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { agentCli } from '../../scripts/lab/processes.js';

/**
 * `blocksnap-agent run` (dist/: npm run build) refuses a plain ws:// URL to
 * a non-loopback address as a configuration error (exit 2) before it starts
 * anything, unless "insecure": true or --insecure says otherwise.
 * 192.0.2.1 (TEST-NET-1) is never reachable: an accepted URL only redials.
 */
describe('agent: plain ws:// to another host', () => {
  const dir = mkdtempSync(join(tmpdir(), 'bsn-insecure-'));
  const config = (extra: object = {}) => ({
    appliance: 'ws://192.0.2.1:7700/v1/agent', agent: 'db1', token: 'bsn_x', stateDir: join(dir, 'state'), volumes: [], tracking: 'off', ...extra,
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('is a configuration error (exit 2) naming the way out, and nothing was started', async () => {
    const file = join(dir, 'plain.json');
    await writeFile(file, JSON.stringify(config()));
    const r = await execa(process.execPath, [agentCli(), 'run', '--config', file], { reject: false, stdin: 'ignore', timeout: 30_000 });
    expect(r.exitCode, String(r.stderr)).toBe(2);
    expect(String(r.stderr)).toMatch(/E_CONFIG: .*ws:\/\/192\.0\.2\.1.*cleartext.*"insecure": true.*--insecure/s);
    // The start creates the state directory (control socket) first thing: it never ran.
    await expect(stat(join(dir, 'state'))).rejects.toThrow(/ENOENT/);
  });

  it.each([
    ['"insecure": true', config({ insecure: true }), []],
    ['--insecure', config(), ['--insecure']],
  ])('with %s the agent starts and dials', async (name, cfg, flags) => {
    const file = join(dir, `${name.replace(/\W/g, '')}.json`);
    await writeFile(file, JSON.stringify(cfg));
    const child = spawn(process.execPath, [agentCli(), 'run', '--config', file, ...flags], {
      stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, BLOCKSNAP_LOG: 'debug' },
    });
    const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    try {
      // The first redial attempt (or its failure) shows the URL was accepted.
      const line = await new Promise<string>((resolve, reject) => {
        createInterface({ input: child.stderr! }).on('line', (l) => {
          if (/cannot reach appliance|redialling/.test(l)) resolve(l);
        });
        void exited.then((c) => reject(new Error(`agent exited (${c}) instead of dialling`)));
        setTimeout(() => reject(new Error('no dial attempt within 30 s')), 30_000).unref();
      });
      expect(line).not.toMatch(/E_CONFIG/);
    } finally {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(t);
    }
  });
});
