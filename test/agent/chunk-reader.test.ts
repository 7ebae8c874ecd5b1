import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decompress } from 'zstd-napi';
import { readChunks, type ReadChunk, type ReadPlan } from '../../agent/reader/chunk-reader.js';
import { OrderedOutput } from '../../agent/reader/ordered-output.js';
import { liveReaderWorkers } from '../../agent/reader/worker-pool.js';
import { chunkContent, writeChunk, writeTestImage, type ImageInfo } from '../support/random-image.js';
import { isBlocksnapError } from '../../proto/errors.js';

const CS = 16 << 10;
const VOLUME = CS * 500 + 3000; // short last chunk
const ZERO = Buffer.alloc(32);

interface Ref { bytes: Buffer; zero: boolean[]; digests: Buffer }

/** Straightforward single-threaded reference, computed from the file itself. */
async function reference(path: string, volumeSize = VOLUME): Promise<Ref> {
  const bytes = await readFile(path);
  const n = Math.ceil(volumeSize / CS);
  const zero: boolean[] = [];
  const digests = Buffer.alloc(n * 32);
  for (let i = 0; i < n; i++) {
    const c = bytes.subarray(i * CS, Math.min((i + 1) * CS, volumeSize));
    zero.push(c.every((b) => b === 0));
    if (!zero[i]) createHash('sha256').update(c).digest().copy(digests, i * 32);
  }
  return { bytes, zero, digests };
}

async function collect(plan: ReadPlan, opts: Parameters<typeof readChunks>[1] = {}) {
  const stream = readChunks(plan, { taskChunks: 7, ...opts });
  const chunks: ReadChunk[] = [];
  for await (const c of stream) chunks.push({ ...c, digest: Buffer.from(c.digest), data: c.data && Buffer.from(c.data) });
  expect(liveReaderWorkers()).toBe(0);
  return { chunks, stats: stream.stats() };
}

function expectStrictlyIncreasing(chunks: ReadChunk[]): void {
  for (let k = 1; k < chunks.length; k++) expect(chunks[k]!.index).toBeGreaterThan(chunks[k - 1]!.index);
}

/** Every emitted chunk: digest, plain length and data round-trip against the file. */
function expectFaithful(chunks: ReadChunk[], ref: Ref, volumeSize = VOLUME): void {
  for (const c of chunks) {
    const plain = ref.bytes.subarray(c.index * CS, Math.min((c.index + 1) * CS, volumeSize));
    expect(c.plainLength).toBe(plain.length);
    expect(c.digest.equals(ref.digests.subarray(c.index * 32, c.index * 32 + 32))).toBe(true);
    if (c.zero) {
      expect(c.data).toBeUndefined();
      expect(c.digest.equals(ZERO)).toBe(true);
    } else {
      expect(decompress(c.data!).equals(plain)).toBe(true);
    }
  }
}

/** OS threads of this process: the workers must really be gone, not just forgotten. */
function threadCount(): number {
  return Number(/^Threads:\s+(\d+)/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]);
}

let dir: string;
let image: ImageInfo;
let ref: Ref;
const plan = (over: Partial<ReadPlan> = {}): ReadPlan =>
  ({ path: image.path, volumeSize: VOLUME, chunkSize: CS, startIndex: 0, mode: 'full', ...over });
const nonZero = () => ref.zero.flatMap((z, i) => (z ? [] : [i]));

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'blocksnap-reader-'));
  image = await writeTestImage(join(dir, 'a.img'), { chunkSize: CS, volumeSize: VOLUME, seed: 7 });
  ref = await reference(image.path);
  // The image must really mix every kind, or the assertions below prove little.
  for (const k of ['zero', 'random', 'text', 'mixed', 'repeat'] as const) {
    expect(image.kinds.filter((x) => x === k).length).toBeGreaterThan(10);
  }
  expect(ref.zero[image.chunkCount - 1]).toBe(false);
});

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('full mode', () => {
  it.each([1, 2, 4])('emits exactly the nonzero chunks, in order, with %i worker(s)', async (workers) => {
    const { chunks, stats } = await collect(plan(), { workers });
    expectStrictlyIncreasing(chunks);
    expect(chunks.map((c) => c.index)).toEqual(nonZero());
    expect(chunks.every((c) => !c.zero)).toBe(true);
    expectFaithful(chunks, ref);
    expect(stats).toMatchObject({
      chunksConsidered: image.chunkCount, chunksRead: image.chunkCount,
      chunksZero: image.chunkCount - nonZero().length, chunksEmitted: nonZero().length,
      chunksUnchanged: 0, bytesRead: VOLUME,
    });
    expect(stats.bytesEmitted).toBe(chunks.reduce((s, c) => s + c.data!.length, 0));
  });

  it('gives identical chunks identical digests (repeat chunks)', async () => {
    const { chunks } = await collect(plan(), { taskChunks: undefined });
    const repeats = chunks.filter((c) => image.kinds[c.index] === 'repeat' && c.plainLength === CS);
    expect(new Set(repeats.map((c) => c.digest.toString('hex'))).size).toBe(1);
    expect(chunks.map((c) => c.index)).toEqual(nonZero());
  });

  it('select restricts reads to the selected chunks', async () => {
    const n = image.chunkCount;
    const select = new Uint32Array(Math.ceil(n / 32));
    const chosen = new Set<number>();
    for (let i = 0; i < n; i++) if (i % 3 === 1 || (i >= 200 && i < 260) || i === n - 1) chosen.add(i);
    for (const i of chosen) select[i >>> 5]! |= 1 << (i & 31);
    const { chunks, stats } = await collect(plan({ select }), { workers: 2 });
    expect(chunks.map((c) => c.index)).toEqual(nonZero().filter((i) => chosen.has(i)));
    expectFaithful(chunks, ref);
    const selectedBytes = [...chosen].reduce((s, i) => s + Math.min(CS, VOLUME - i * CS), 0);
    expect(stats.bytesRead).toBe(selectedBytes);
    expect(stats.chunksConsidered).toBe(chosen.size);
    expect(stats.chunksRead).toBe(chosen.size);

    // Unselected chunks past the end of the file would fail with E_DEVICE if
    // they were read at all: a proof that does not trust the reader's stats.
    const longer = VOLUME - 3000 + 40 * CS;
    const wide = new Uint32Array(Math.ceil(longer / CS / 32));
    wide.set(select);
    wide[(n - 1) >>> 5]! &= ~(1 << ((n - 1) & 31));
    const past = await collect(plan({ volumeSize: longer, select: wide }), { workers: 2 });
    expect(past.chunks.map((c) => c.index)).toEqual(nonZero().filter((i) => chosen.has(i) && i !== n - 1));
  });

  it('startIndex resumes: nothing below it is read or emitted', async () => {
    const { chunks, stats } = await collect(plan({ startIndex: 123 }), { workers: 2 });
    expect(chunks.map((c) => c.index)).toEqual(nonZero().filter((i) => i >= 123));
    expectFaithful(chunks, ref);
    expect(stats.bytesRead).toBe(VOLUME - 123 * CS);
    expect(stats.chunksConsidered).toBe(image.chunkCount - 123);
    const end = await collect(plan({ startIndex: image.chunkCount }));
    expect(end.chunks).toEqual([]);
    expect(end.stats.bytesRead).toBe(0);
  });
});

describe('incremental mode', () => {
  let changedPath: string;
  let changedRef: Ref;
  const modified = new Map<number, 'rewrite' | 'to-zero' | 'from-zero' | 'same'>();

  beforeAll(async () => {
    changedPath = join(dir, 'b.img');
    await copyFile(image.path, changedPath);
    const n = image.chunkCount;
    const firstZero = ref.zero.indexOf(true);
    const nz = nonZero();
    modified.set(nz[3]!, 'rewrite').set(nz[40]!, 'rewrite').set(n - 1, 'rewrite');
    modified.set(nz[10]!, 'to-zero').set(nz[11]!, 'to-zero');
    modified.set(firstZero, 'from-zero').set(ref.zero.indexOf(true, 300), 'from-zero');
    modified.set(nz[20]!, 'same');
    for (const [i, how] of modified) {
      const len = Math.min(CS, VOLUME - i * CS);
      const data = how === 'to-zero' ? Buffer.alloc(len)
        : how === 'same' ? ref.bytes.subarray(i * CS, i * CS + len)
        : chunkContent('text', 99, i, len);
      await writeChunk(changedPath, CS, i, data);
    }
    changedRef = await reference(changedPath);
  });

  it('emits exactly the changed chunks, including chunks that became zero', async () => {
    const { chunks, stats } = await collect(
      { ...plan({ mode: 'incremental', basisDigests: ref.digests }), path: changedPath }, { workers: 2 },
    );
    const expected = [...modified].filter(([, how]) => how !== 'same').map(([i]) => i).sort((a, b) => a - b);
    expect(chunks.map((c) => c.index)).toEqual(expected);
    expectFaithful(chunks, changedRef);
    for (const c of chunks) expect(c.zero).toBe(modified.get(c.index) === 'to-zero');
    expect(stats.chunksUnchanged).toBe(image.chunkCount - expected.length);
    expect(stats.chunksEmitted).toBe(expected.length);
  });

  it('without basis digests emits every selected chunk, zero ones as zero', async () => {
    const select = new Uint32Array(Math.ceil(image.chunkCount / 32));
    for (const i of modified.keys()) select[i >>> 5]! |= 1 << (i & 31);
    const { chunks, stats } = await collect({ ...plan({ mode: 'incremental', select }), path: changedPath });
    expect(chunks.map((c) => c.index)).toEqual([...modified.keys()].sort((a, b) => a - b));
    expectFaithful(chunks, changedRef);
    for (const c of chunks) expect(c.zero).toBe(changedRef.zero[c.index]);
    expect(stats.bytesRead).toBe([...modified.keys()].reduce((s, i) => s + Math.min(CS, VOLUME - i * CS), 0));
  });
});

describe('errors', () => {
  it('data ending before volumeSize is E_DEVICE, after every chunk before the failing task', async () => {
    const volumeSize = VOLUME + 20 * CS;
    const got: number[] = [];
    const stream = readChunks(plan({ volumeSize }), { workers: 2, taskChunks: 7 });
    const err = await (async () => {
      for await (const c of stream) got.push(c.index);
    })().catch((e: unknown) => e);
    expect(isBlocksnapError(err, 'E_DEVICE')).toBe(true);
    expect(String((err as Error).message)).toMatch(/data ends at byte/);
    const failingTask = Math.floor((image.chunkCount - 1) / 7) * 7;
    expect(got).toEqual(nonZero().filter((i) => i < failingTask));
    expect(liveReaderWorkers()).toBe(0);
  });

  it('a missing file is E_DEVICE and starts no worker', async () => {
    const err = await collect(plan({ path: join(dir, 'missing.img') })).catch((e: unknown) => e);
    expect(isBlocksnapError(err, 'E_DEVICE')).toBe(true);
    expect(liveReaderWorkers()).toBe(0);
  });

  it('refuses bad plans with E_USAGE', () => {
    const bad: Partial<ReadPlan>[] = [
      { chunkSize: 3000 }, { startIndex: image.chunkCount + 1 }, { volumeSize: -1 },
      { basisDigests: ref.digests }, // full + basis would drop unchanged chunks
      { mode: 'incremental', basisDigests: ref.digests.subarray(32) },
      { select: new Uint32Array(2) },
    ];
    for (const b of bad) expect(() => readChunks(plan(b))).toThrow(expect.objectContaining({ code: 'E_USAGE' }));
    const s = readChunks(plan());
    s[Symbol.asyncIterator]();
    expect(() => s[Symbol.asyncIterator]()).toThrow(expect.objectContaining({ code: 'E_USAGE' }));
  });
});

describe('abort and early exit', () => {
  it('abort mid-way rejects with E_CANCELLED and leaves no thread behind', async () => {
    await collect(plan(), { workers: 2 }); // warm-up: lazily created runtime threads exist now
    const before = threadCount();
    const ac = new AbortController();
    const it = readChunks(plan(), { workers: 2, taskChunks: 1, signal: ac.signal })[Symbol.asyncIterator]();
    try {
      for (let k = 0; k < 20; k++) expect((await it.next()).done).toBe(false);
      expect(liveReaderWorkers()).toBe(2);
      // ≥ 1 OS thread per worker (more from sources: tsx's hooks run on a thread of their own)
      expect(threadCount()).toBeGreaterThanOrEqual(before + 2);
      ac.abort(new Error('operator said stop'));
      let err: unknown;
      for (let k = 0; k < 2 && !err; k++) err = await it.next().then(() => undefined, (e: unknown) => e);
      expect(isBlocksnapError(err, 'E_CANCELLED')).toBe(true);
      expect(liveReaderWorkers()).toBe(0);
      expect(threadCount()).toBe(before);
      expect(await it.next()).toEqual({ done: true, value: undefined });
    } finally {
      await it.return?.();
    }
  });

  it('breaking out of the loop terminates the workers', async () => {
    let seen = 0;
    for await (const c of readChunks(plan(), { workers: 4, taskChunks: 3 })) {
      expect(c.index).toBeGreaterThanOrEqual(0);
      if (++seen === 5) break;
    }
    expect(liveReaderWorkers()).toBe(0);
  });

  it('an already aborted signal starts nothing', async () => {
    const err = await collect(plan(), { signal: AbortSignal.abort() }).catch((e: unknown) => e);
    expect(isBlocksnapError(err, 'E_CANCELLED')).toBe(true);
  });

  it.each(['abort', 'abandon'])('a process that %ss a read exits on its own', async (how) => {
    const script = join(dir, `child-${how}.mts`);
    const reader = pathToFileURL(join(import.meta.dirname, '../../agent/reader/chunk-reader.ts')).href;
    await writeFile(script, `
      import { readChunks } from ${JSON.stringify(reader)};
      const ac = new AbortController();
      const it = readChunks(${JSON.stringify(plan())}, { workers: 2, taskChunks: 1, signal: ac.signal })[Symbol.asyncIterator]();
      await it.next(); await it.next();
      if (${JSON.stringify(how)} === 'abort') {
        setTimeout(() => ac.abort(), 5);
        try { for (;;) { const r = await it.next(); if (r.done) break; await new Promise((r) => setTimeout(r, 1)); } }
        catch (e) { console.log('ended', e.code); }
      } else {
        console.log('ended abandoned');
      }
    `);
    const tsx = pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;
    const { code, stdout } = await new Promise<{ code: number | null; stdout: string }>((resolve) => {
      const child = execFile(process.execPath, ['--import', tsx, script], { timeout: 30_000 }, (e, stdout) =>
        resolve({ code: e ? (e.code as number) ?? null : 0, stdout }));
      void child;
    });
    expect(code).toBe(0);
    expect(stdout.trim()).toBe(how === 'abort' ? 'ended E_CANCELLED' : 'ended abandoned');
  });
});

describe('OrderedOutput', () => {
  it('hands out results strictly in sequence whatever the arrival order', async () => {
    const out = new OrderedOutput<string>();
    out.put(2, 'c');
    const first = out.take(0);
    out.put(1, 'b');
    out.put(0, 'a');
    expect(await first).toBe('a');
    expect(await out.take(1)).toBe('b');
    expect(await out.take(2)).toBe('c');
  });

  it('delivers a task error in its place and a global failure at once', async () => {
    const out = new OrderedOutput<string>();
    out.putError(1, new Error('task 1'));
    out.put(0, 'a');
    expect(await out.take(0)).toBe('a');
    await expect(out.take(1)).rejects.toThrow('task 1');
    const waiting = out.take(2);
    out.fail(new Error('gone'));
    out.put(2, 'late');
    await expect(waiting).rejects.toThrow('gone');
    await expect(out.take(3)).rejects.toThrow('gone');
  });
});
