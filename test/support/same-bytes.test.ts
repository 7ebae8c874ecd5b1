import { mkdtemp, open, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareFiles } from './same-bytes.js';

/** compareFiles must say what cmp says: same length and every byte, holes read as zeros. */
describe('compareFiles agrees with cmp', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'blocksnap-same-bytes-'));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  const MiB = 1 << 20;
  async function file(name: string, size: number, writes: Array<[number, Buffer]> = []): Promise<string> {
    const p = join(dir, name);
    await writeFile(p, '');
    await truncate(p, size);
    const fh = await open(p, 'r+');
    for (const [at, b] of writes) await fh.write(b, 0, b.length, at);
    await fh.close();
    return p;
  }
  const cmp = async (a: string, b: string, n?: number) => (await execa('cmp', n === undefined ? [a, b] : ['-n', String(n), a, b], { reject: false })).exitCode === 0;

  it.each([
    ['identical sparse files (holes vs holes)', 10 * MiB + 123, [], []],
    ['one byte differs in the last window', 10 * MiB + 123, [[10 * MiB + 100, Buffer.from([1])]], []],
    ['one byte differs in the first window', 9 * MiB, [[0, Buffer.from([7])]], [[0, Buffer.from([8])]]],
    ['written zeros vs a hole', 9 * MiB, [[5 * MiB, Buffer.alloc(MiB)]], []],
    ['data vs a hole, past several windows', 17 * MiB, [[13 * MiB + 5, Buffer.from('x')]], []],
    ['same data on both', 8 * MiB, [[4 * MiB - 2, Buffer.from('abcd')]], [[4 * MiB - 2, Buffer.from('abcd')]]],
  ] as Array<[string, number, Array<[number, Buffer]>, Array<[number, Buffer]>]>)('%s', async (name, size, wa, wb) => {
    const a = await file(`${name}-a`, size, wa);
    const b = await file(`${name}-b`, size, wb);
    const got = await compareFiles(a, b);
    expect(got.identical).toBe(await cmp(a, b));
    if (!got.identical) expect(got.detail).toMatch(/differ: byte \d+/);
  });

  it('different lengths are not identical (cmp: EOF), even when one is a prefix of the other', async () => {
    const a = await file('short', 4 * MiB);
    const b = await file('long', 4 * MiB + 1);
    expect(await cmp(a, b)).toBe(false);
    expect((await compareFiles(a, b)).identical).toBe(false);
  });

  it('the first differing byte is the one cmp names', async () => {
    const a = await file('first-a', 12 * MiB, [[9 * MiB + 17, Buffer.from('q')], [2 * MiB + 3, Buffer.from('r')]]);
    const b = await file('first-b', 12 * MiB);
    const r = await execa('cmp', [a, b], { reject: false });
    const byte = /byte (\d+)/.exec(String(r.stdout))![1];
    expect((await compareFiles(a, b)).detail).toContain(`byte ${byte} `);
  });

  it('-n: only the first N bytes count', async () => {
    const a = await file('n-a', 6 * MiB, [[5 * MiB, Buffer.from('z')]]);
    const b = await file('n-b', 7 * MiB);
    expect((await compareFiles(a, b, 5 * MiB)).identical).toBe(await cmp(a, b, 5 * MiB));
    expect((await compareFiles(a, b, 5 * MiB + 1)).identical).toBe(await cmp(a, b, 5 * MiB + 1));
  });
});
