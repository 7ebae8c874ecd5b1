import { execa } from 'execa';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readFile, readdir, readlink, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { agentCli, applianceCmd } from '../../scripts/lab/processes.js';
import { chunkCountOf, goodChunk, makeVolume, nonZeroIndexes, ScriptedAgent, type TestVolume } from '../../appliance/testing/scripted-agent.js';
import { envelope } from '../../proto/messages.js';
import { zstdCompress } from '../../proto/shared/zstd.js';

/**
 * `blocksnap-appliance export --to` against a real running appliance (the
 * CLI talks to it over its control socket; one case with it stopped): the
 * target is checked before a byte is written, nothing blocksnap did not
 * create is replaced or deleted, and a crash-consistent export leaves no
 * PostgreSQL sidecar of an earlier export behind. Runs the compiled CLI
 * (dist/): `npm run build`.
 */
const SIZE = 24 * 65536 + 4096;
const WAL_NAME = '000000010000000000000003';
const WAL_BYTES = Buffer.alloc(65536, 'wal record bytes; ');
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** A full transfer that also sends the PostgreSQL backup info and one WAL file: a PostgreSQL image. */
async function transferPg(a: ScriptedAgent, jobId: string, v: TestVolume): Promise<string> {
  await a.begin(jobId, v);
  await a.next('volumeReady', jobId);
  const idx = nonZeroIndexes(v);
  for (let i = 0; i < idx.length; i += 4) {
    await a.batch(jobId, idx.slice(i, i + 4).map((n) => goodChunk(v, n)));
    await a.next('ack', jobId);
  }
  await a.send(envelope('pgBackupInfo', {
    jobId, labelFile: 'START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\nCHECKPOINT LOCATION: 0/3000060\n',
    spcmapFile: '', startLsn: '0/3000028', stopLsn: '0/3000138', timeline: 1, replayLsn: '', exclusive: false,
    serverVersion: 150010, role: 'primary', pausedSeconds: 0, backupSeconds: 0.1, walSegmentSize: 16 << 20,
  }));
  await a.send(envelope('walPiece', {
    jobId, fileName: WAL_NAME, offset: 0, data: zstdCompress(WAL_BYTES), plainLength: WAL_BYTES.length,
    digest: createHash('sha256').update(WAL_BYTES).digest(), fileSize: WAL_BYTES.length,
  }));
  await a.end(jobId, chunkCountOf(v), v);
  const committed = await a.next('committed', jobId);
  await a.result(jobId, true, committed.imageId);
  return committed.imageId;
}

describe('export --to: the target', () => {
  let root: string;
  let out: string;
  let h: ApplianceHarness;
  let crashId: string;
  let pgId: string;
  let crashBytes: Buffer;

  beforeAll(async () => {
    expect(existsSync(agentCli()), 'run npm run build first').toBe(true);
    root = await mkdtemp(join(tmpdir(), 'bsn-export-target-'));
    out = join(root, 'out');
    await mkdir(out);
    h = await startAppliance(['db1'], { dataDir: join(root, 'data') });
    const a = await ScriptedAgent.connect(h.url);
    try {
      const v = makeVolume('pgdata', SIZE, 65536, [3, 4, 5]);
      await a.login('db1', h.tokens.db1!, [v]);
      const job = h.app.router.startJob('db1', 'pgdata', 'full');
      await a.transfer(job.id, v);
      crashId = (await job.done).imageId!;
      crashBytes = v.data;
      const job2 = h.app.router.startJob('db1', 'pgdata', 'full');
      pgId = await transferPg(a, job2.id, makeVolume('pgdata', SIZE, 65536, [7]));
      expect((await job2.done).ok).toBe(true);
    } finally {
      await a.close();
    }
  });

  afterAll(async () => {
    await h?.close({ keepData: true });
    if (root) await rm(root, { recursive: true, force: true });
  });

  /** What a refusal must leave: exit 2, E_USAGE naming the target, and no temp file in its directory. */
  async function refused(args: string[], target: string, reason: RegExp) {
    const before = (await readdir(out)).sort();
    const r = await applianceCmd(h.dataDir, args);
    expect(r.exitCode, r.stdout + r.stderr).toBe(2);
    expect(r.stderr).toMatch(/E_USAGE/);
    expect(r.stderr).toContain(target);
    expect(r.stderr).toMatch(reason);
    expect((await readdir(out)).sort()).toEqual(before);
    return r;
  }

  it('an existing file: refused without --force (unchanged), replaced with it', async () => {
    const f = join(out, 'existing.raw');
    await writeFile(f, 'precious operator data\n');
    const ino = (await stat(f)).ino;
    await refused(['export', crashId, '--to', f], f, /exists.*--force/);
    expect(await readFile(f, 'utf8')).toBe('precious operator data\n');
    expect((await stat(f)).ino).toBe(ino);

    const r = await applianceCmd(h.dataDir, ['export', crashId, '--to', f, '--force', '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(sha(await readFile(f))).toBe(sha(crashBytes));
    expect((await readdir(out)).sort()).toEqual(['existing.raw']);
  });

  it('a symlink is never followed nor replaced, even with --force', async () => {
    const victim = join(out, 'victim.txt');
    await writeFile(victim, 'not an image\n');
    const link = join(out, 'link.raw');
    await symlink(victim, link);
    for (const force of [[], ['--force']]) await refused(['export', crashId, '--to', link, ...force], link, /symbolic link/);
    expect(await readlink(link)).toBe(victim);
    expect(await readFile(victim, 'utf8')).toBe('not an image\n');
    await rm(link);
    await rm(victim);
  });

  it('device nodes are refused (a restore writes devices, not export), even with --force', async () => {
    const chr = join(out, 'null-like');
    await execa('mknod', [chr, 'c', '1', '3']); // the same device as /dev/null
    const blk = join(out, 'loop-like');
    await execa('mknod', [blk, 'b', '7', '250']);
    try {
      for (const [node, kind] of [[chr, 'character device'], [blk, 'block device']] as const) {
        for (const force of [[], ['--force']]) await refused(['export', crashId, '--to', node, ...force], node, new RegExp(`${kind}.*restore`));
      }
      expect((await lstat(chr)).isCharacterDevice()).toBe(true);
      expect((await lstat(blk)).isBlockDevice()).toBe(true);
    } finally {
      await rm(chr, { force: true });
      await rm(blk, { force: true });
    }
  });

  it('a directory is refused before anything is written, even with --force', async () => {
    const d = join(out, 'adir');
    await mkdir(d);
    await writeFile(join(d, 'keep'), 'x');
    for (const force of [[], ['--force']]) await refused(['export', crashId, '--to', d, ...force], d, /a directory/);
    expect(await readdir(d)).toEqual(['keep']);
    await rm(d, { recursive: true });
  });

  it('anything inside the data directory is refused: catalog.sqlite, a new name, a path through a symlinked directory', async () => {
    const catalog = join(h.dataDir, 'catalog.sqlite');
    const catalogSha = sha(await readFile(catalog));
    const viaLink = join(out, 'data-link');
    await symlink(h.dataDir, viaLink);
    try {
      for (const [target, force] of [[catalog, ['--force']], [join(h.dataDir, 'new.raw'), []], [join(h.dataDir, 'store', 'x.raw'), []], [join(viaLink, 'catalog.sqlite'), ['--force']]] as const) {
        await refused(['export', crashId, '--to', target, ...force], target, /inside the appliance's data directory/);
      }
    } finally {
      await rm(viaLink);
    }
    expect(existsSync(join(h.dataDir, 'new.raw'))).toBe(false);
    // The appliance still has its catalog and serves.
    expect(sha(await readFile(catalog))).toBe(catalogSha);
    const list = await applianceCmd(h.dataDir, ['images', 'list', '--json']);
    expect(list.exitCode, list.stderr).toBe(0);
    expect(list.json.map((i: any) => i.id)).toContain(pgId);
  });

  it('an unrelated FILE.wal directory is never deleted, even with --force', async () => {
    const f = join(out, 'db.raw');
    await mkdir(`${f}.wal`);
    await writeFile(`${f}.wal`.concat('/mine.txt'), 'operator notes\n');
    for (const force of [[], ['--force']]) await refused(['export', pgId, '--to', f, ...force], f, /was not created by blocksnap/);
    // A crash-consistent export to that name would not touch it either.
    await refused(['export', crashId, '--to', f, '--force'], f, /was not created by blocksnap/);
    expect(await readFile(join(`${f}.wal`, 'mine.txt'), 'utf8')).toBe('operator notes\n');
    expect(existsSync(f)).toBe(false);
    await rm(`${f}.wal`, { recursive: true });
  });

  it('a crash-consistent export over a PostgreSQL export leaves no sidecar or WAL of the old image', async () => {
    const f = join(out, 'pg.raw');
    const r1 = await applianceCmd(h.dataDir, ['export', pgId, '--to', f, '--json']);
    expect(r1.exitCode, r1.stderr).toBe(0);
    const side = JSON.parse(await readFile(`${f}.blocksnap.json`, 'utf8'));
    expect(side).toMatchObject({ format: 'blocksnap-pg-sidecar', version: 2, imageId: pgId, image: { volumeSize: SIZE, chunkSize: 65536 } });
    expect(side.image.rootDigest).toBe(h.app.catalog.image(pgId)!.rootDigest);
    expect(side.exportFile).toMatchObject({ name: 'pg.raw', ino: String((await stat(f)).ino), size: SIZE });
    expect(side.wal).toEqual([{ name: WAL_NAME, size: WAL_BYTES.length, sha256: sha(WAL_BYTES) }]);
    expect((await readdir(`${f}.wal`)).sort()).toEqual(['.blocksnap-wal', WAL_NAME]);
    expect(sha(await readFile(join(`${f}.wal`, WAL_NAME)))).toBe(sha(WAL_BYTES));

    // Without --force the sidecar and WAL count as part of the target.
    await refused(['export', crashId, '--to', f], f, /exists.*--force/);
    const r2 = await applianceCmd(h.dataDir, ['export', crashId, '--to', f, '--force', '--json']);
    expect(r2.exitCode, r2.stderr).toBe(0);
    expect(sha(await readFile(f))).toBe(sha(crashBytes));
    expect(existsSync(`${f}.blocksnap.json`)).toBe(false);
    expect(existsSync(`${f}.wal`)).toBe(false);
    expect((await readdir(out)).filter((n) => n.startsWith('pg.raw') || n.startsWith('.pg.raw'))).toEqual(['pg.raw']);

    // Only a sidecar and its export: the sidecar alone (file removed by hand) still needs --force.
    const r3 = await applianceCmd(h.dataDir, ['export', pgId, '--to', f, '--force', '--json']);
    expect(r3.exitCode, r3.stderr).toBe(0);
    await rm(f);
    await refused(['export', crashId, '--to', f], f, /sidecar.*exists.*--force/);
    await rm(`${f}.blocksnap.json`);
    await rm(`${f}.wal`, { recursive: true });
  });

  it('with the appliance stopped, the CLI itself refuses the data directory and an existing file', async () => {
    await h.close({ keepData: true });
    try {
      const catalog = join(h.dataDir, 'catalog.sqlite');
      await refused(['export', crashId, '--to', catalog, '--force'], catalog, /inside the appliance's data directory/);
      const f = join(out, 'offline.raw');
      await writeFile(f, 'keep me');
      await refused(['export', crashId, '--to', f], f, /exists/);
      expect(await readFile(f, 'utf8')).toBe('keep me');
      await rm(f);
    } finally {
      h = await startAppliance(['db1'], { dataDir: h.dataDir });
    }
  });
});
