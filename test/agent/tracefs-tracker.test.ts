import { closeSync, existsSync, fdatasyncSync, mkdtempSync, openSync, readFileSync, rmdirSync, rmSync, writeSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { freezeFilesystem, thawFilesystem } from '../../agent/snapshot/fsfreeze.js';
import { ChangeBitmap } from '../../agent/cbt/change-bitmap.js';
import { cleanupStaleInstances, parseInstanceName, tracefsRoot } from '../../agent/cbt/tracefs/tracefs-instance.js';
import { TracefsTracker } from '../../agent/cbt/tracefs/tracefs-tracker.js';
import type { ClosedGeneration, Tracker } from '../../agent/cbt/tracker.js';
import { TrackerState } from '../../agent/cbt/tracker-state.js';
import { CONTRACT_CHUNK, trackerContract } from './tracker.contract.js';
import { blkdiscard, createLoopRig, ddRead, ddWrite, ownInstances, removeOwnInstances, type LoopRig } from './tracker-fixtures.js';

const MiB = 1024 * 1024;
const C = CONTRACT_CHUNK;

trackerContract('tracefs', async () => {
  const loop = await createLoopRig(64 * MiB);
  return {
    tracker: new TracefsTracker(),
    device: loop.device,
    deviceSize: 64 * MiB,
    write: (offset, length) => ddWrite(loop.device, offset, length),
    discard: (offset, length) => blkdiscard(loop.device, offset, length),
    another: () => new TracefsTracker(),
    teardown: () => loop.release(),
  };
});

async function cut(t: Tracker): Promise<ClosedGeneration> {
  await t.prepareSwitch();
  return t.completeSwitch();
}

/** Runs `fn` with a started tracker on a fresh loop device; releases both whatever happens. */
async function withTracked(
  size: number,
  fn: (t: TracefsTracker, loop: LoopRig) => Promise<void>,
  opts: { bufferSizeKb?: number; chunkSize?: number } = {},
): Promise<void> {
  const loop = await createLoopRig(size);
  const t = new TracefsTracker({ bufferSizeKb: opts.bufferSizeKb });
  try {
    await t.start({ device: loop.device, chunkSize: opts.chunkSize ?? C, generation: 1 });
    await cut(t); // generation 2 is valid
    await fn(t, loop);
  } finally {
    try {
      if (t.phase !== 'new' && t.phase !== 'stopped') await t.stop();
    } finally {
      await loop.release();
    }
  }
}

afterEach(async () => {
  // A failed test must not leave its tracing instance behind.
  const left = await removeOwnInstances();
  expect(left).toEqual([]);
});

describe('TracefsTracker on a real loop device', () => {
  it('counts writes, discards and write-zeroes; ignores reads and flushes', async () => {
    await withTracked(64 * MiB, async (t, loop) => {
      await ddWrite(loop.device, 3 * C, 4096); // chunk 3
      await ddWrite(loop.device, 5 * C + C - 512, 512); // last sector of chunk 5 only
      await ddWrite(loop.device, 8 * C - 512, 1024); // straddles 7|8: both, by construction
      await blkdiscard(loop.device, 12 * C, C); // discard (D): chunk 12
      await blkdiscard(loop.device, 14 * C, 2 * C, true); // write-zeroes (N): chunks 14, 15
      await ddRead(loop.device, 40 * C, 4 * C); // reads: nothing
      await execa('blockdev', ['--flushbufs', loop.device]); // flush: nothing
      const g = await cut(t);
      expect(g.validity).toEqual({ valid: true });
      expect([...g.bitmap.indexes()]).toEqual([3, 5, 7, 8, 12, 14, 15]);
    });
  });

  it('drain barrier: a write completed just before completeSwitch is always in the closed generation', async () => {
    await withTracked(64 * MiB, async (t, loop) => {
      // A flood of single-sector writes in chunks >= 600 keeps the reader
      // busy while each write under test is made and the switch completes
      // right after it. (On an idle machine the reader is fast enough that
      // this would also pass without the barrier; it pins the guarantee.)
      const flood = execa('dd', ['if=/dev/zero', `of=${loop.device}`, 'bs=512', 'count=2000000', `seek=${(600 * C) / 512}`, 'oflag=direct', 'status=none'], { reject: false });
      const fd = openSync(loop.device, 'r+');
      try {
        const block = Buffer.alloc(4096, 0xa5);
        for (let i = 0; i < 300; i++) {
          // Synchronous write + flush from this thread: nothing the reader
          // posted can be handled between the write and completeSwitch().
          writeSync(fd, block, 0, block.length, i * C);
          fdatasyncSync(fd);
          await t.prepareSwitch();
          const g = await t.completeSwitch();
          // The previous write may be here too: its record can reach the
          // reader after prepareSwitch() and then goes into both (superset).
          const bits = [...g.bitmap.indexes()].filter((b) => b < 600);
          expect(bits).toContain(i);
          expect(bits.every((b) => b === i || b === i - 1)).toBe(true);
          expect(g.validity).toEqual({ valid: true });
        }
      } finally {
        closeSync(fd);
        flood.kill('SIGKILL');
        await flood;
      }
    });
  });

  it('names its instance after the owning process and removes it at stop', async () => {
    const loop = await createLoopRig(16 * MiB);
    const t = new TracefsTracker();
    try {
      await t.start({ device: loop.device, chunkSize: C, generation: 1 });
      const owner = parseInstanceName(t.instanceName);
      expect(owner?.pid).toBe(process.pid);
      const root = await tracefsRoot();
      const dir = path.join(root, 'instances', t.instanceName);
      expect(existsSync(dir)).toBe(true);
      expect(readFileSync(path.join(dir, 'events/block/block_bio_queue/filter'), 'utf8').trim()).toBe(
        `dev == ${7 * 2 ** 20 + Number(loop.device.replace('/dev/loop', ''))} && !(rwbs ~ "R*")`,
      );
      await t.stop();
      expect(existsSync(dir)).toBe(false);
    } finally {
      if (t.phase !== 'stopped' && t.phase !== 'new') await t.stop();
      await loop.release();
    }
  });

  it('tracks a partition in partition-relative chunks, including writes made through the whole disk', async () => {
    const start = 2048; // sectors: 1 MiB
    const sectors = 65536; // 32 MiB
    const loop = await createLoopRig(64 * MiB, { mbr: { start, sectors } });
    const part = `${loop.device}p1`;
    const t = new TracefsTracker();
    try {
      for (let i = 0; i < 100 && !existsSync(part); i++) await new Promise((r) => setTimeout(r, 20));
      await t.start({ device: part, chunkSize: C, generation: 1 });
      expect(t.startInfo.identity.size).toBe(sectors * 512);
      await cut(t);
      await ddWrite(part, 3 * C, 4096); // partition chunk 3
      await ddWrite(loop.device, start * 512 + 7 * C, 4096); // through the disk: partition chunk 7
      await ddWrite(loop.device, 0, 4096); // before the partition: not ours
      await ddWrite(loop.device, (start + sectors) * 512 + C, 4096); // after it: not ours
      await ddWrite(loop.device, start * 512 - 512, 1024); // straddles the start: partition chunk 0
      const g = await cut(t);
      expect(g.validity).toEqual({ valid: true });
      expect([...g.bitmap.indexes()]).toEqual([0, 3, 7]);
    } finally {
      if (t.phase !== 'stopped' && t.phase !== 'new') await t.stop();
      await loop.release();
    }
  });

  it('reports lost events from a tiny ring buffer as invalid, with the reason', async () => {
    await withTracked(
      64 * MiB,
      async (t, loop) => {
        // 20 000 single-sector O_DIRECT writes from two processes at once
        // overrun a 4 KiB per-CPU buffer long before the reader catches up.
        for (let round = 0; round < 5 && t.validity().valid; round++) {
          await Promise.all(
            [0, 1].map((i) =>
              execa('dd', ['if=/dev/zero', `of=${loop.device}`, 'bs=512', 'count=10000', `seek=${i * 20000}`, 'oflag=direct', 'status=none']),
            ),
          );
          await t.checkpoint();
        }
        const g = await cut(t);
        expect(g.validity.valid).toBe(false);
        expect(!g.validity.valid && g.validity.reason).toMatch(/lost/);
        // A generation opened after the loss is trusted again.
        await ddWrite(loop.device, 50 * C, 512);
        const g2 = await cut(t);
        expect(g2.validity).toEqual({ valid: true });
        expect([...g2.bitmap.indexes()]).toEqual([50]);
      },
      { bufferSizeKb: 4 },
    );
  });

  it('invalidates when the device is resized under it', async () => {
    await withTracked(16 * MiB, async (t, loop) => {
      await execa('truncate', ['-s', String(32 * MiB), loop.image]);
      await execa('losetup', ['--set-capacity', loop.device]);
      const g = await cut(t);
      expect(g.validity).toEqual({
        valid: false,
        reason: `while tracking ${loop.device}: device size changed: saved 16777216 bytes, now 33554432 bytes`,
      });
    });
  });
});

describe('TracefsTracker persistence across a restart', () => {
  const dirs: string[] = [];
  afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

  it('resumes after a clean stop with no writes, refuses after an untracked write', async () => {
    const stateDir = mkdtempSync(path.join(os.tmpdir(), 'blocksnap-trackerstate-'));
    dirs.push(stateDir);
    const file = path.join(stateDir, 'vol.cbt');
    const loop = await createLoopRig(32 * MiB);
    const open = (gen: number) =>
      TrackerState.open({ file, tracker: new TracefsTracker(), device: loop.device, chunkSize: C, expectedGeneration: gen, saveIntervalMs: 0 });
    let s: TrackerState | null = null;
    try {
      s = await open(1);
      expect(s.resume.valid).toBe(false);
      await cut(s.tracker);
      await ddWrite(loop.device, 2 * C, 4096);
      const cp = await s.close();
      s = null;
      expect(cp.generation).toBe(2);

      s = await open(2); // nothing written in between
      expect(s.resume).toEqual({ valid: true });
      await ddWrite(loop.device, 4 * C, 4096);
      const g = await cut(s.tracker);
      expect(g.validity).toEqual({ valid: true });
      expect([...g.bitmap.indexes()]).toEqual([2, 4]);
      await s.close();
      s = null;

      await ddWrite(loop.device, 6 * C, 4096); // while nobody tracks
      s = await open(3);
      expect(s.resume.valid).toBe(false);
      expect(!s.resume.valid && s.resume.reason).toBe(
        'device written while untracked: 8 write and 0 discard I/Os since the clean shutdown',
      ); // dd bs=512 count=8 oflag=direct: 8 I/Os;
    } finally {
      if (s) await s.close().catch(() => {});
      await loop.release();
    }
  });
});

describe('TracefsTracker against the true change of an ext4 filesystem', () => {
  let lab: VolumeLab | null = null;
  afterEach(async () => {
    if (lab) await lab.destroy();
    lab = null;
  });

  it('misses 0 chunks of what file writes, deletes, sync and fstrim change', async () => {
    lab = await createVolumeLab({ volumeSize: 128 * MiB, poolSize: 512 * MiB });
    const chunk = 4096;
    const t = new TracefsTracker();
    const copies = path.join(lab.root, 'copies');
    await mkdir(copies);
    const copy = async (name: string) => {
      // The snapshot: freeze, read the device around its page cache, thaw.
      await t.prepareSwitch();
      await freezeFilesystem(lab!.volumeMount);
      try {
        await execa('dd', [`if=${lab!.volumeDevice}`, `of=${path.join(copies, name)}`, 'bs=1M', 'iflag=direct', 'status=none']);
      } finally {
        await thawFilesystem(lab!.volumeMount);
      }
      return t.completeSwitch();
    };
    try {
      const files = path.join(lab.volumeMount, 'data');
      await mkdir(files);
      for (let i = 0; i < 20; i++) await writeFile(path.join(files, `old-${i}`), randomBytes(50_000 + i * 7919));
      await execa('sync');
      // ext4 trims every free block at the first fstrim of a mount and only
      // newly freed ones afterwards: do the first one before the baseline.
      await execa('fstrim', [lab.volumeMount]);
      await t.start({ device: lab.volumeDevice, chunkSize: chunk, generation: 1 });
      await copy('before.img');

      for (let i = 0; i < 30; i++) await writeFile(path.join(files, `new-${i}`), randomBytes(10_000 + i * 4099));
      for (let i = 0; i < 20; i += 3) rmSync(path.join(files, `old-${i}`));
      await execa('dd', ['if=/dev/urandom', `of=${path.join(files, 'old-1')}`, 'bs=4096', 'seek=3', 'count=2', 'conv=notrunc', 'status=none']);
      await writeFile(path.join(files, 'old-2'), randomBytes(3000), { flag: 'a' });
      await execa('sync');
      const g = await copy('written.img');
      const w = compare(g, path.join(copies, 'before.img'), path.join(copies, 'written.img'), chunk);
      expect(w.truth).toBeGreaterThan(100);
      // Extras here are rewrites of identical bytes (journal, bitmaps): few.
      expect(w.tracked).toBeLessThan(w.truth * 2);

      // fstrim: the volume is one block group, and freeing blocks in a group
      // makes ext4 trim all of its free space again; the discarded chunks
      // that already read as zero are extras, explained.
      await execa('fstrim', [lab.volumeMount]);
      const g2 = await copy('trimmed.img');
      const d = compare(g2, path.join(copies, 'written.img'), path.join(copies, 'trimmed.img'), chunk);
      expect(d.truth).toBeGreaterThan(10); // the deleted files' blocks now read as zeros
      console.log(`ext4 writes: changed ${w.truth}, tracked ${w.tracked}; fstrim: changed ${d.truth}, tracked ${d.tracked}; missed 0`);
    } finally {
      if (t.phase !== 'new' && t.phase !== 'stopped') await t.stop();
    }
  });
});

describe('stale instances', () => {
  it('kill -9 leaves an instance that cleanupStaleInstances removes; live and foreign ones stay', async () => {
    const loop = await createLoopRig(16 * MiB);
    const mine = new TracefsTracker();
    const root = await tracefsRoot();
    const foreign = path.join(root, 'instances', `bsnaptest-foreign-${process.pid}`);
    const children: Array<{ pid: number; instance: string }> = [];
    let hang: ReturnType<typeof execa> | null = null;
    let hangExited = false;
    try {
      await mine.start({ device: loop.device, chunkSize: C, generation: 1 });
      await mkdir(foreign);
      const child = path.join(import.meta.dirname, 'tracker-owner-child.ts');

      hang = execa('node', ['--import', 'tsx', child, loop.device, 'hang'], { stdin: 'ignore', reject: false });
      const line = await firstLine(hang);
      children.push({ pid: hang.pid!, instance: JSON.parse(line).instance });
      expect(existsSync(path.join(root, 'instances', children[0]!.instance))).toBe(true);
      process.kill(hang.pid!, 'SIGKILL');
      await hang;
      hangExited = true;

      // A process that exits without stop() must still exit (no hang on trace_pipe).
      const t0 = Date.now();
      const exiting = await execa('node', ['--import', 'tsx', child, loop.device, 'exit'], { stdin: 'ignore', timeout: 30_000 });
      expect(Date.now() - t0).toBeLessThan(30_000);
      const exited = JSON.parse(exiting.stdout.split('\n')[0]!).instance as string;
      children.push({ pid: parseInstanceName(exited)!.pid, instance: exited });

      const ours = new Set(children.map((c) => c.instance));
      const removed = await cleanupStaleInstances({ filter: (name) => ours.has(name) || name === mine.instanceName });
      expect(removed.sort()).toEqual([...ours].sort());
      for (const c of children) expect(existsSync(path.join(root, 'instances', c.instance))).toBe(false);
      expect(existsSync(path.join(root, 'instances', mine.instanceName))).toBe(true); // owner alive
      expect(existsSync(foreign)).toBe(true); // not blocksnap's
      expect(mine.validity()).toBeDefined();
    } finally {
      // Every step runs even if an earlier one throws.
      await attemptAll([
        async () => {
          if (hang && !hangExited) {
            hang.kill('SIGKILL');
            await hang;
          }
        },
        () => cleanupStaleInstances({ filter: (name) => children.some((c) => c.instance === name) }),
        async () => existsSync(foreign) && rmdirSync(foreign),
        async () => {
          if (mine.phase !== 'new' && mine.phase !== 'stopped') await mine.stop();
        },
        () => loop.release(),
      ]);
    }
    expect(await ownInstances()).toEqual([]);
  });
});

async function attemptAll(steps: Array<() => Promise<unknown>>): Promise<void> {
  const errors: unknown[] = [];
  for (const step of steps) await step().catch((e) => errors.push(e));
  if (errors.length > 0) throw new AggregateError(errors, 'cleanup failed');
}

function firstLine(p: ReturnType<typeof execa>): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf = '';
    p.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl >= 0) resolve(buf.slice(0, nl));
    });
    p.once('exit', () => reject(new Error(`child exited before printing: ${buf}`)));
  });
}

function randomBytes(n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i += 4) b.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, Math.min(i, n - 4));
  return b;
}

/** Checks a generation against the byte comparison of two images: valid, 0 missed. */
function compare(g: ClosedGeneration, before: string, after: string, chunk: number): { truth: number; tracked: number } {
  expect(g.validity).toEqual({ valid: true });
  const truth = trueChange(before, after, chunk);
  const missed = [...truth.indexes()].filter((i) => !g.bitmap.has(i));
  expect(missed).toEqual([]);
  return { truth: truth.count(), tracked: g.bitmap.count() };
}

/** The chunks whose bytes differ between two images of the same device. */
function trueChange(a: string, b: string, chunk: number): ChangeBitmap {
  const x = readFileSync(a);
  const y = readFileSync(b);
  expect(x.length).toBe(y.length);
  const bm = new ChangeBitmap(x.length, chunk);
  for (let off = 0, i = 0; off < x.length; off += chunk, i++) {
    if (x.compare(y, off, Math.min(off + chunk, x.length), off, Math.min(off + chunk, x.length)) !== 0) bm.setChunk(i);
  }
  return bm;
}
