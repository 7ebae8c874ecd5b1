import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { applianceCli, applianceCmd, spawnAppliance, type ApplianceProcess } from '../../scripts/lab/processes.js';

/**
 * One appliance per data directory, by a kernel lock (DESIGN.md §2): a
 * stale appliance.pid naming a live, unrelated process (normal after a
 * reboot) does not block serve or store reindex; a live appliance does
 * (E_BUSY, exit 75), and kill -9 releases its lock. Runs dist/.
 */
describe('the data directory lock', () => {
  let root: string;
  const procs = new Set<ApplianceProcess>();
  let bystander: ChildProcess | undefined;

  beforeAll(async () => {
    expect(existsSync(applianceCli()), 'run npm run build first').toBe(true);
    root = await mkdtemp(join(tmpdir(), 'bsn-lock-'));
  });
  afterEach(async () => {
    await Promise.allSettled([...procs].map((p) => p.stop()));
    procs.clear();
    if (bystander && bystander.exitCode === null && bystander.signalCode === null) {
      const gone = new Promise((r) => bystander!.once('exit', r));
      bystander.kill('SIGKILL');
      await gone;
    }
    bystander = undefined;
  });
  afterAll(async () => {
    if (root) await rm(root, { recursive: true, force: true });
  });

  async function serve(dataDir: string): Promise<ApplianceProcess> {
    const p = await spawnAppliance(dataDir, { logFile: `${dataDir}.log` });
    procs.add(p);
    return p;
  }

  it('a stale appliance.pid naming a live unrelated process does not block serve or store reindex', async () => {
    const dataDir = join(root, 'stale');
    // A first run creates the data directory, then stops; the pid file is rewritten to name a live bystander.
    const first = await serve(dataDir);
    expect(await first.stop()).toBe(0);
    procs.delete(first);
    bystander = spawn('sleep', ['300'], { stdio: 'ignore' });
    await writeFile(join(dataDir, 'appliance.pid'), `${bystander.pid}\n`);

    const r = await applianceCmd(dataDir, ['store', 'reindex', '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    await writeFile(join(dataDir, 'appliance.pid'), `${bystander.pid}\n`);
    const a = await serve(dataDir);
    expect((await readFile(join(dataDir, 'appliance.pid'), 'utf8')).split(' ')[0]).toBe(String(a.pid));
    const list = await applianceCmd(dataDir, ['agents', 'list', '--json']);
    expect(list.exitCode, list.stderr).toBe(0);
  });

  it('a second appliance on the same data directory gets E_BUSY; so do reindex and rebuild; kill -9 frees it', async () => {
    const dataDir = join(root, 'busy');
    const a = await serve(dataDir);
    const second = await spawnAppliance(dataDir, { logFile: `${dataDir}.second.log` }).then(
      (p) => { procs.add(p); return null; },
      (e: Error) => e,
    );
    expect(second?.message).toMatch(/exited \(75\)/);
    const log = await readFile(`${dataDir}.second.log`, 'utf8');
    expect(log).toMatch(new RegExp(`E_BUSY.*in use by appliance pid ${a.pid}`));
    for (const args of [['store', 'reindex'], ['catalog', 'rebuild']]) {
      const r = await applianceCmd(dataDir, args);
      expect(r.exitCode, r.stderr).toBe(75);
      expect(r.stderr).toMatch(/E_BUSY/);
    }
    await a.kill9();
    procs.delete(a);
    const b = await serve(dataDir); // the kernel dropped the lock with the process
    expect(b.pid).not.toBe(a.pid);
  });

  it('a lock file that is not a database (damaged) does not stop serve', async () => {
    const dataDir = join(root, 'garbage');
    const a = await serve(dataDir);
    expect(await a.stop()).toBe(0);
    procs.delete(a);
    await writeFile(join(dataDir, 'appliance.lock'), 'garbage, not an SQLite file '.repeat(10));
    await serve(dataDir);
  });
});
