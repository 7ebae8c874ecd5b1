import { execa } from 'execa';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { agentCli, applianceCmd } from '../../scripts/lab/processes.js';
import { makeVolume, ScriptedAgent } from '../../appliance/testing/scripted-agent.js';
import { startAppliance } from '../../scripts/lab/appliance-harness.js';

/**
 * The appliance CLI against a data directory filled by a real (scripted)
 * agent: listings, catalog rebuild from the store alone, verify naming a
 * corrupted chunk, export. Runs the compiled CLI (dist/): `npm run build`.
 */
describe('blocksnap-appliance CLI', () => {
  let dataDir: string;
  let root: string;
  let imageIds: string[] = [];

  beforeAll(async () => {
    expect(existsSync(agentCli()), 'run npm run build first').toBe(true);
    root = await mkdtemp(join(tmpdir(), 'bsn-cli-'));
    dataDir = join(root, 'data');
    const h = await startAppliance(['db1'], { dataDir });
    try {
      const a = await ScriptedAgent.connect(h.url);
      const v = makeVolume('pgdata', 40 * 65536 + 4096, 65536, [3, 4, 5]);
      await a.login('db1', h.tokens.db1!, [v]);
      for (let i = 0; i < 2; i++) {
        const job = h.app.router.startJob('db1', 'pgdata', 'full');
        await a.transfer(job.id, v);
        const o = await job.done;
        expect(o.ok).toBe(true);
        imageIds.push(o.imageId!);
      }
      a.close();
    } finally {
      await h.close({ keepData: true });
    }
  });

  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('prints help with exit 0 and refuses bad usage with exit 2', async () => {
    for (const cli of [join(agentCli(), '..', '..', 'appliance', 'cli.js'), agentCli()]) {
      const h = await execa(process.execPath, [cli, '--help'], { reject: false });
      expect(h.exitCode).toBe(0);
      expect(h.stdout).toMatch(/Usage:/);
    }
    const bad = await applianceCmd(dataDir, ['frobnicate']);
    expect(bad.exitCode).toBe(2);
    expect(bad.stderr).toMatch(/E_USAGE/);
  });

  it('lists agents, images and jobs as JSON', async () => {
    const agents = await applianceCmd(dataDir, ['agents', 'list', '--json']);
    expect(agents.json.map((a: any) => a.name)).toEqual(['db1']);
    const images = await applianceCmd(dataDir, ['images', 'list', '--json']);
    expect(images.json.map((i: any) => i.id)).toEqual(imageIds);
    const show = await applianceCmd(dataDir, ['images', 'show', imageIds[0]!]);
    expect(show.stdout).toMatch(/crash-consistent/);
    const jobs = await applianceCmd(dataDir, ['jobs', 'list', '--json']);
    expect(jobs.json.filter((j: any) => j.state === 'committed')).toHaveLength(2);
    const missing = await applianceCmd(dataDir, ['images', 'show', 'img-nope']);
    expect(missing.exitCode).toBe(1);
    expect(missing.stderr).toMatch(/E_NOT_FOUND/);
  });

  it('rebuilds the catalog from the store alone', async () => {
    const before = (await applianceCmd(dataDir, ['images', 'list', '--json'])).json;
    for (const f of await readdir(dataDir)) if (f.startsWith('catalog.sqlite')) await rm(join(dataDir, f));
    const r = await applianceCmd(dataDir, ['catalog', 'rebuild', '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.json.added).toBe(2);
    const after = (await applianceCmd(dataDir, ['images', 'list', '--json'])).json;
    const strip = (i: any) => ({ id: i.id, rootDigest: i.rootDigest, volume: i.volume, agent: i.agent, kind: i.kind, volumeSize: i.volumeSize });
    expect(after.map(strip)).toEqual(before.map(strip));
    // The rebuilt agent has no usable token until it is rotated.
    const rot = await applianceCmd(dataDir, ['agents', 'rotate', 'db1', '--json']);
    expect(rot.json.token).toMatch(/^bsn_/);
  });

  it('exports a sparse raw image and verify names a corrupted chunk', async () => {
    const out = join(root, 'img.raw');
    const ex = await applianceCmd(dataDir, ['export', imageIds[1]!, '--to', out, '--json']);
    expect(ex.exitCode, ex.stderr).toBe(0);
    const st = await stat(out);
    expect(st.size).toBe(40 * 65536 + 4096);
    expect(st.blocks * 512).toBeLessThan(st.size); // zero chunks are holes

    const ok = await applianceCmd(dataDir, ['verify', '--json']);
    expect(ok.exitCode, ok.stdout + ok.stderr).toBe(0);
    // Flip one byte in the middle of the first pack's payload area.
    const packsDir = join(dataDir, 'store', 'packs');
    const sub = (await readdir(packsDir))[0]!;
    const pack = join(packsDir, sub, (await readdir(join(packsDir, sub)))[0]!);
    const fh = await open(pack, 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, 100);
    b[0] = b[0]! ^ 0xff;
    await fh.write(b, 0, 1, 100);
    await fh.close();
    const bad = await applianceCmd(dataDir, ['verify', '--json']);
    expect(bad.exitCode).toBe(1);
    const badChunks = bad.json.flatMap((r: any) => r.bad);
    expect(badChunks.length).toBeGreaterThan(0);
    expect(badChunks[0].code).toBe('E_STORE_CORRUPT');
    expect(typeof badChunks[0].index).toBe('number');
  });
});
