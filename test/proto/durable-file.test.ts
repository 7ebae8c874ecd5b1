import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { writeDurable, writeFileDurably } from '../../proto/shared/durable-file.js';
import { expectDurableOrder, haveStrace, repoRoot, traceDurableWrite } from '../support/durable-write-trace.js';
import { tempDirEach } from '../support/temp-dir.js';


describe('writeDurable: the one durable write', () => {
  const work = tempDirEach('bs-durable-');

  it('streams through fill, replaces the file, forces the mode whatever the umask, leaves no temp', async () => {
    const file = path.join(work.path, 'a.bin');
    await writeFile(file, 'old');
    const old = process.umask(0o077);
    try {
      await writeDurable(file, async (fh) => {
        await fh.write(Buffer.from('he'), 0, 2, 0);
        await fh.write(Buffer.from('llo'), 0, 3, 2);
      }, { mode: 0o644 });
    } finally {
      process.umask(old);
    }
    expect(await readFile(file, 'utf8')).toBe('hello');
    expect((await stat(file)).mode & 0o777).toBe(0o644);
    expect(await readdir(work.path)).toEqual(['a.bin']);
  });

  it('a failing fill leaves the old file and no temp; the error comes back as is', async () => {
    const file = path.join(work.path, 'a.bin');
    await writeFile(file, 'old');
    const boom = new Error('boom');
    await expect(writeDurable(file, async () => { throw boom; })).rejects.toBe(boom);
    expect(await readFile(file, 'utf8')).toBe('old');
    expect(await readdir(work.path)).toEqual(['a.bin']);
  });

  it('owner and tmpDir: the file gets the owner; the temp is made in tmpDir', async () => {
    const tmp = path.join(work.path, 'tmp');
    const file = path.join(work.path, 'out', 'b.json'); // out/ does not exist yet
    await writeFileDurably(path.join(tmp, 'keep'), 'x');
    await writeDurable(file, (fh) => fh.writeFile('{}'), { owner: { uid: 4321, gid: 4322 }, tmpDir: tmp });
    const st = await stat(file);
    expect([st.uid, st.gid, st.mode & 0o777]).toEqual([4321, 4322, 0o600]);
    expect((await stat(path.dirname(file))).mode & 0o777).toBe(0o700);
    expect(await readdir(tmp)).toEqual(['keep']);
  });

  it.skipIf(!haveStrace)('syscalls: temp O_EXCL, fchown, fsync, rename over the file, then directory fsync', async () => {
    const file = path.join(work.path, 'postgresql.auto.conf');
    const t = expectDurableOrder(traceDurableWrite(work.path, `import { writeDurable } from ${JSON.stringify(path.join(repoRoot, 'proto/shared/durable-file.js'))};
await writeDurable(${JSON.stringify(file)}, (fh) => fh.writeFile('x = 1\\n'), { owner: { uid: 4321, gid: 4321 } });\n`,
    { target: file, tmpMark: path.join(work.path, '.postgresql.auto.conf.'), extraSyscalls: ['fchown'] }));
    const fd = t.lines[t.openTmp]!.match(/= (\d+)$/)![1];
    const chown = t.lines.findIndex((l, i) => i > t.openTmp && l.includes(`fchown(${fd}, 4321, 4321)`));
    expect(chown).toBeGreaterThan(t.openTmp);
    expect(t.syncTmp).toBeGreaterThan(chown);
    expect(await readFile(file, 'utf8')).toBe('x = 1\n');
  });
});
