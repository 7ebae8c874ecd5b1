import Database from 'better-sqlite3';
import { existsSync } from 'node:fs';
import { cp, mkdir, mkdtemp, open, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startAppliance } from '../../scripts/lab/appliance-harness.js';
import { applianceCli, applianceCmd, spawnAppliance, type ApplianceProcess } from '../../scripts/lab/processes.js';
import { makeVolume, plainOf, ScriptedAgent, sha256, type TestVolume } from '../../appliance/testing/scripted-agent.js';
import { FOOTER_SIZE, packRelPath } from '../../appliance/store/pack-format.js';

/**
 * One damaged file must not stop the appliance (DESIGN.md §6). A data
 * directory with three images (volumes a, b and the victim v, each in its
 * own packs) is copied per case and damaged one way; then a real appliance
 * process must start, serve the healthy images (exported bytes compared),
 * list the victim as damaged naming the object, and `verify` must report
 * every image and exit 1. `store reindex` / `catalog rebuild` skip and
 * report what they cannot read. Runs dist/ (`npm run build`).
 */
describe('a damaged file does not stop the appliance', () => {
  let root: string;
  let template: string;
  const vols: Record<string, TestVolume> = {};
  const images: Record<string, { id: string; root: string }> = {};
  let victimPack = '';
  const running = new Set<ApplianceProcess>();

  beforeAll(async () => {
    expect(existsSync(applianceCli()), 'run npm run build first').toBe(true);
    root = await mkdtemp(join(tmpdir(), 'bsn-damage-'));
    template = join(root, 'template');
    const h = await startAppliance(['db1'], { dataDir: template });
    try {
      for (const name of ['a', 'b', 'v']) vols[name] = makeVolume(name, 24 * 65536 + 4096, 65536, [2, 7]);
      const agent = await ScriptedAgent.connect(h.url);
      await agent.login('db1', h.tokens.db1!, Object.values(vols));
      for (const name of ['a', 'b', 'v']) {
        const job = h.app.router.startJob('db1', name, 'full');
        await agent.transfer(job.id, vols[name]!);
        const o = await job.done;
        expect(o.ok, JSON.stringify(o)).toBe(true);
        images[name] = { id: o.imageId!, root: h.app.catalog.image(o.imageId!)!.rootDigest };
      }
      victimPack = h.app.store.locate(Buffer.from(images.v!.root, 'hex'))!.pack;
      // Every blob of the victim is in its own pack(s): damaging them touches no other image.
      for (const n of ['a', 'b']) expect(h.app.store.locate(Buffer.from(images[n]!.root, 'hex'))!.pack).not.toBe(victimPack);
      await agent.close();
    } finally {
      await h.close({ keepData: true });
    }
  });

  afterAll(async () => {
    await Promise.allSettled([...running].map((a) => a.stop()));
    if (root) await rm(root, { recursive: true, force: true });
  });

  const packFile = (dataDir: string, id: string) => join(dataDir, 'store', 'packs', packRelPath(id));
  const manifestFile = (dataDir: string, id: string) => join(dataDir, 'store', 'manifests', `${id}.json`);

  async function copyTemplate(name: string): Promise<string> {
    const dir = join(root, name);
    await cp(template, dir, { recursive: true });
    return dir;
  }

  function sql(file: string, statement: string, ...params: unknown[]): void {
    const db = new Database(file);
    try {
      db.prepare(statement).run(...params);
    } finally {
      db.close();
    }
  }

  async function flipByte(file: string, at: number): Promise<void> {
    const fh = await open(file, 'r+');
    try {
      const b = Buffer.alloc(1);
      await fh.read(b, 0, 1, at);
      b[0] = b[0]! ^ 0x5a;
      await fh.write(b, 0, 1, at);
    } finally {
      await fh.close();
    }
  }

  async function serve(dataDir: string): Promise<ApplianceProcess> {
    const a = await spawnAppliance(dataDir, { logFile: `${dataDir}.log` });
    running.add(a);
    return a;
  }

  async function stop(a: ApplianceProcess): Promise<void> {
    expect(await a.stop()).toBe(0);
    running.delete(a);
  }

  /** What every case must show while the appliance runs: healthy images served, the victim damaged and named, verify exit 1. */
  async function expectServesHealthyAndNamesVictim(dataDir: string, named: RegExp, opts: { victimListed?: boolean } = {}) {
    const list = await applianceCmd(dataDir, ['images', 'list', '--json']);
    expect(list.exitCode, list.stderr).toBe(0);
    const byId = new Map<string, any>(list.json.map((i: any) => [i.id, i]));
    for (const n of ['a', 'b']) expect(byId.get(images[n]!.id)?.damage, n).toEqual([]);
    const victim = byId.get(images.v!.id);
    expect(victim, 'the damaged image is still listed').toBeDefined();
    expect(victim.damage.length).toBeGreaterThan(0);
    expect(JSON.stringify(victim.damage)).toMatch(named);

    const out = join(root, `export-${Math.random().toString(36).slice(2)}.raw`);
    const ex = await applianceCmd(dataDir, ['export', images.a!.id, '--to', out, '--json']);
    expect(ex.exitCode, ex.stderr).toBe(0);
    expect((await readFile(out)).equals(vols.a!.data)).toBe(true);
    await rm(out, { force: true });

    const v = await applianceCmd(dataDir, ['verify', '--json']);
    expect(v.exitCode, v.stderr).toBe(1);
    const reports = new Map<string, any>(v.json.map((r: any) => [r.imageId, r]));
    expect([...reports.keys()].sort()).toEqual(Object.values(images).map((i) => i.id).sort());
    for (const n of ['a', 'b']) expect(reports.get(images[n]!.id).status).toBe('ok');
    const bad = reports.get(images.v!.id);
    expect(bad.status).toBe('damaged');
    expect(bad.objects.length + bad.bad.length).toBeGreaterThan(0);
    if (opts.victimListed !== false) expect(victim.agent).toBe('db1');
  }

  it('a corrupt pack trailer: store reindex skips and quarantines that pack and indexes the rest; serve starts', async () => {
    const d = await copyTemplate('trailer');
    const f = packFile(d, victimPack);
    await flipByte(f, (await stat(f)).size - FOOTER_SIZE - 10); // inside the trailer
    const r = await applianceCmd(d, ['store', 'reindex', '--json']);
    expect(r.exitCode, r.stderr).toBe(1);
    expect(r.json.skipped).toEqual([expect.objectContaining({ pack: victimPack, quarantinedTo: expect.stringMatching(/^quarantine\//) })]);
    expect(r.json.damaged.map((x: any) => x.imageId)).toEqual([images.v!.id]);
    expect(existsSync(f)).toBe(false);
    const why = JSON.parse(await readFile(join(d, `${r.json.skipped[0].quarantinedTo}.why.json`), 'utf8'));
    expect(why).toMatchObject({ kind: 'pack', object: `pack ${victimPack}`, reason: expect.stringMatching(/trailer|footer/) });
    const a = await serve(d);
    await expectServesHealthyAndNamesVictim(d, new RegExp(victimPack));
    await stop(a);
  });

  it('a corrupt pack trailer and a lost blob index: serve quarantines the pack at start', async () => {
    const d = await copyTemplate('trailer-noindex');
    const f = packFile(d, victimPack);
    await flipByte(f, (await stat(f)).size - FOOTER_SIZE - 10);
    for (const x of await readdir(join(d, 'store'))) if (x.startsWith('index.sqlite')) await rm(join(d, 'store', x));
    const a = await serve(d);
    await expectServesHealthyAndNamesVictim(d, new RegExp(`quarantined: pack ${victimPack}`));
    expect((await readdir(join(d, 'quarantine'))).some((x) => x.endsWith(`${victimPack}.pack`))).toBe(true);
    await stop(a);
  });

  it('an empty .pack file (the victim\'s, and a stray one): serve starts, the victim names its pack', async () => {
    const d = await copyTemplate('empty');
    await truncate(packFile(d, victimPack), 0);
    const stray = 'ab'.padEnd(64, '0');
    await mkdir(join(d, 'store', 'packs', 'ab'), { recursive: true });
    await writeFile(packFile(d, stray), '');
    const a = await serve(d);
    await expectServesHealthyAndNamesVictim(d, new RegExp(`pack ${victimPack} \\(quarantined`));
    const q = await readdir(join(d, 'quarantine'));
    expect(q.filter((x) => x.endsWith('.pack')).length).toBe(2);
    await stop(a);
  });

  it('a truncated manifest without a catalog row: serve starts and lists that image damaged; rebuild restores the healthy ones', async () => {
    const d = await copyTemplate('manifest');
    const m = manifestFile(d, images.v!.id);
    await truncate(m, Math.floor((await stat(m)).size / 2));
    sql(join(d, 'catalog.sqlite'), 'DELETE FROM images WHERE id = ?', images.v!.id);
    const a = await serve(d);
    await expectServesHealthyAndNamesVictim(d, new RegExp(`manifest ${images.v!.id}`), { victimListed: false });
    await stop(a);

    // The original symptom: catalog rebuild restored 0 of 2 healthy images.
    const d2 = await copyTemplate('manifest-rebuild');
    await truncate(manifestFile(d2, images.v!.id), 100);
    for (const x of await readdir(d2)) if (x.startsWith('catalog.sqlite')) await rm(join(d2, x));
    const r = await applianceCmd(d2, ['catalog', 'rebuild', '--json']);
    expect(r.exitCode, r.stderr).toBe(1);
    expect(r.json.added).toBe(2);
    expect(r.json.quarantined).toEqual([expect.objectContaining({ kind: 'manifest', object: `manifest ${images.v!.id}` })]);
    const list = (await applianceCmd(d2, ['images', 'list', '--json'])).json;
    expect(list.filter((i: any) => i.damage.length === 0).map((i: any) => i.id).sort()).toEqual([images.a!.id, images.b!.id].sort());
    expect(list.find((i: any) => i.id === images.v!.id)?.damage[0].object).toBe(`manifest ${images.v!.id}`);
  });

  it('a half-truncated catalog.sqlite: serve moves it aside and rebuilds it from the manifests; so does catalog rebuild', async () => {
    for (const mode of ['serve', 'rebuild'] as const) {
      const d = await copyTemplate(`catalog-${mode}`);
      const c = join(d, 'catalog.sqlite');
      await truncate(c, Math.floor((await stat(c)).size / 2));
      if (mode === 'rebuild') {
        const r = await applianceCmd(d, ['catalog', 'rebuild', '--json']);
        expect(r.exitCode, r.stderr).toBe(1); // something was quarantined
        expect(r.json.added).toBe(3);
        expect(r.json.quarantined[0]).toMatchObject({ kind: 'catalog', to: expect.stringMatching(/^quarantine\/.*catalog\.sqlite$/) });
      }
      const a = await serve(d);
      const list = await applianceCmd(d, ['images', 'list', '--json']);
      expect(list.json.map((i: any) => i.id).sort()).toEqual(Object.values(images).map((i) => i.id).sort());
      const out = join(root, `export-catalog-${mode}.raw`);
      const ex = await applianceCmd(d, ['export', images.b!.id, '--to', out, '--json']);
      expect(ex.exitCode, ex.stderr).toBe(0);
      expect((await readFile(out)).equals(vols.b!.data)).toBe(true);
      await rm(out, { force: true });
      const v = await applianceCmd(d, ['verify', '--json']);
      expect(v.exitCode, v.stdout + v.stderr).toBe(0); // the images are fine: only the catalog was damaged
      expect(v.json).toHaveLength(3);
      expect((await readdir(join(d, 'quarantine'))).some((x) => x.endsWith('catalog.sqlite'))).toBe(true);
      await stop(a);
    }
  });

  it('an unreadable blob index: serve sets it aside and rebuilds it from the packs; nothing is damaged', async () => {
    const d = await copyTemplate('index');
    for (const x of await readdir(join(d, 'store'))) if (x.startsWith('index.sqlite')) await rm(join(d, 'store', x));
    await writeFile(join(d, 'store', 'index.sqlite'), 'not an SQLite database '.repeat(100));
    const a = await serve(d);
    const v = await applianceCmd(d, ['verify', '--json']);
    expect(v.exitCode, v.stdout + v.stderr).toBe(0);
    expect(v.json.map((r: any) => r.status)).toEqual(['ok', 'ok', 'ok']);
    expect((await readdir(join(d, 'quarantine'))).some((x) => x.endsWith('index.sqlite'))).toBe(true);
    await stop(a);
  });

  it('a corrupt chunk found by verify marks its image damaged (never a basis); verify clears it once the pack is whole again', async () => {
    const d = await copyTemplate('chunk');
    const db = new Database(join(d, 'store', 'index.sqlite'), { readonly: true });
    const loc = db.prepare('SELECT pack, offset FROM blobs WHERE digest = ?').get(sha256(plainOf(vols.v!, 0))) as { pack: string; offset: number };
    db.close();
    const a = await serve(d);
    await flipByte(packFile(d, loc.pack), loc.offset + 5);
    const v = await applianceCmd(d, ['verify', '--json']);
    expect(v.exitCode).toBe(1);
    const list = (await applianceCmd(d, ['images', 'list', '--json'])).json;
    const victim = list.find((i: any) => i.id === images.v!.id);
    expect(victim.damage).toEqual([expect.objectContaining({ object: `pack ${loc.pack}`, reason: expect.stringMatching(/^verify: 1 chunk\(s\) bad, first chunk 0 /) })]);
    expect(list.filter((i: any) => i.damage.length).map((i: any) => i.id)).toEqual([images.v!.id]);
    await flipByte(packFile(d, loc.pack), loc.offset + 5); // the operator restores the pack
    const again = await applianceCmd(d, ['verify', images.v!.id, '--json']);
    expect(again.exitCode, again.stdout).toBe(0);
    expect((await applianceCmd(d, ['images', 'show', images.v!.id, '--json'])).json.damage).toEqual([]);
    await stop(a);
  });

  it('a deleted pack: serve starts and names the missing pack', async () => {
    const d = await copyTemplate('deleted');
    await rm(packFile(d, victimPack));
    const a = await serve(d);
    await expectServesHealthyAndNamesVictim(d, new RegExp(`pack ${victimPack} \\(file missing\\)`));
    const human = await applianceCmd(d, ['images', 'list']);
    expect(human.stdout).toMatch(new RegExp(`^${images.v!.id}\t.*\tDAMAGED: pack ${victimPack} \\(file missing\\)`, 'm'));
    expect(human.stdout.match(/DAMAGED/g)).toHaveLength(1);
    await stop(a);
  });

  it('a missing root blob: serve starts and names the root', async () => {
    const d = await copyTemplate('root');
    sql(join(d, 'store', 'index.sqlite'), 'DELETE FROM blobs WHERE digest = ?', Buffer.from(images.v!.root, 'hex'));
    const a = await serve(d);
    await expectServesHealthyAndNamesVictim(d, new RegExp(`root blob ${images.v!.root}`));
    await stop(a);
    // Offline verify (no appliance running) reports every image too.
    const v = await applianceCmd(d, ['verify']);
    expect(v.exitCode).toBe(1);
    expect(v.stdout).toMatch(new RegExp(`DAMAGED ${images.v!.id}`));
    expect(v.stdout.match(/^ok /gm)).toHaveLength(2);
  });
});
