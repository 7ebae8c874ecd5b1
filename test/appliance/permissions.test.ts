import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startAppliance } from '../../scripts/lab/appliance-harness.js';
import { makeVolume, ScriptedAgent } from '../../appliance/testing/scripted-agent.js';
import { writeFileDurably } from '../../proto/shared/durable-file.js';

/**
 * Nothing in the data directory is readable by other local users
 * (DESIGN.md §2): the directory and everything under it is 0700 / 0600
 * whatever the umask, checked by stat after a real backup (packs,
 * manifests, catalog and blob index with their -wal/-shm, lock, quarantine).
 */
describe('data directory permissions', () => {
  let root: string;
  let oldMask: number;

  beforeAll(async () => {
    oldMask = process.umask(0o022); // the usual default: without explicit modes files would be 0644
    root = await mkdtemp(join(tmpdir(), 'bsn-perm-'));
  });
  afterAll(async () => {
    process.umask(oldMask);
    if (root) await rm(root, { recursive: true, force: true });
  });

  async function walk(dir: string, out: { path: string; mode: number; dir: boolean }[] = []) {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) {
        out.push({ path: p, mode: (await stat(p)).mode & 0o777, dir: true });
        await walk(p, out);
      } else if (e.isFile()) {
        out.push({ path: p, mode: (await stat(p)).mode & 0o777, dir: false });
      }
    }
    return out;
  }

  it('is 0700 with 0600 files under umask 022, also when the directory existed as 0755', async () => {
    const dataDir = join(root, 'data');
    await mkdir(dataDir, { mode: 0o755 });
    const h = await startAppliance(['db1'], { dataDir });
    try {
      const a = await ScriptedAgent.connect(h.url);
      const v = makeVolume('pgdata', 20 * 65536, 65536, [1]);
      await a.login('db1', h.tokens.db1!, [v]);
      const job = h.app.router.startJob('db1', 'pgdata', 'full');
      await a.transfer(job.id, v);
      expect((await job.done).ok).toBe(true);
      await a.close();
    } finally {
      await h.close({ keepData: true });
    }
    // As an older version left them: a 0755 pack directory with a 0644 pack (here an empty one,
    // so the next start also writes to the quarantine).
    await mkdir(join(dataDir, 'store', 'packs', 'cd'), { mode: 0o755 });
    await writeFile(join(dataDir, 'store', 'packs', 'cd', `${'cd'.padEnd(64, '1')}.pack`), '', { mode: 0o644 });
    const h2 = await startAppliance(['db1'], { dataDir });
    try {
      const entries = await walk(dataDir);
      const names = entries.map((e) => e.path.slice(dataDir.length + 1));
      for (const want of ['catalog.sqlite', 'catalog.sqlite-wal', 'appliance.lock', 'store/index.sqlite', 'store/index.sqlite-wal', 'quarantine']) {
        expect(names, want).toContain(want);
      }
      expect(names.some((n) => /^store\/packs\/..\/[0-9a-f]{64}\.pack$/.test(n))).toBe(true);
      expect(names.some((n) => /^store\/manifests\/img-.*\.json$/.test(n))).toBe(true);
      expect(names.some((n) => n.endsWith('.why.json'))).toBe(true);
      expect((await stat(dataDir)).mode & 0o777).toBe(0o700);
      const wrong = entries.filter((e) => e.mode !== (e.dir ? 0o700 : 0o600));
      expect(wrong.map((e) => `${e.path.slice(dataDir.length + 1)} ${e.mode.toString(8)}`)).toEqual([]);
    } finally {
      await h2.close({ keepData: true });
    }
  });

  it('writeFileDurably gives the mode asked for whatever the umask', async () => {
    const f = join(root, 'x', 'state.json');
    await writeFileDurably(f, Buffer.from('{}'));
    expect((await stat(f)).mode & 0o777).toBe(0o600);
    expect((await stat(join(root, 'x'))).mode & 0o777).toBe(0o700);
    await writeFileDurably(f, Buffer.from('{}'), 0o640);
    expect((await stat(f)).mode & 0o777).toBe(0o640);
  });
});
