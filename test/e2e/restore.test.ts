import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { RestoreResult } from '../../agent/restore/restore-run.js';
import type { RetainingSnapshotProvider } from '../../agent/snapshot/retaining-provider.js';
import type { ChunkStore } from '../../appliance/store/chunk-store.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { agentCli } from '../../scripts/lab/processes.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { compareFiles } from '../support/same-bytes.js';
import { ddWrite } from '../support/volume-writes.js';

/**
 * `blocksnap-agent restore` (issue 9 items 6-7) with real parts: a loop
 * volume with ext4, the in-process appliance and agent (tracefs tracker),
 * restores onto new files, loop devices and the volume's own device.
 * Every restore is compared byte for byte with the retained snapshot the
 * image was taken from.
 */
const CHUNK = 64 << 10;

describe('restore an image onto a device or file', () => {
  const fx = e2eFixture();
  let lab: VolumeLab;
  let appl: ApplianceHarness;
  let agent: Agent;
  let keeper: RetainingSnapshotProvider;
  let stateDir: string;
  let configFile: string;
  let imageA: { id: string; snap: string };

  async function backup(mode: 'full' | 'incremental'): Promise<{ id: string; snap: string }> {
    const job = appl.app.router.startJob('db1', 'vol', mode);
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    const snap = keeper.kept.get(`vol@${job.id}`);
    expect(snap, 'kept snapshot').toBeTruthy();
    return { id: outcome.imageId!, snap: snap! };
  }

  async function restore(image: string, target: string, o: { changedOnly?: boolean; force?: boolean } = {}): Promise<RestoreResult> {
    return agent.restoreImage({ imageId: image, target, changedOnly: !!o.changedOnly, force: !!o.force });
  }

  async function cmp(a: string, b: string, bytes?: number): Promise<void> {
    const r = await compareFiles(a, b, bytes);
    expect(r.identical, `${a} differs from ${b}: ${r.detail}`).toBe(true);
  }

  async function sha(file: string): Promise<string> {
    const r = await execa('sha256sum', [file]);
    return String(r.stdout).split(' ')[0]!;
  }

  /** A sparse file of `size` bytes attached as a loop device (released at dispose). */
  async function scratchDevice(name: string, size: number): Promise<string> {
    const file = join(lab.poolMount, name);
    const fh = await open(file, 'wx');
    await fh.truncate(size);
    await fh.close();
    fx.defer(`remove ${file}`, () => rm(file, { force: true }));
    const dev = await attachLoop(file);
    fx.defer(`detach ${dev}`, () => detachLoop(dev, { backingFile: file }));
    return dev;
  }

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 3 * 1024 ** 3, name: 'vol' });
    // Data scattered over the filesystem: files of random bytes, leaving free (zero) space.
    for (let i = 0; i < 6; i++) await ddWrite(join(lab.volumeMount, `f${i}`), { bs: 1 << 20, count: 8 + i * 3 });
    appl = await fx.appliance(['db1'], { auditEvery: 0 });
    stateDir = join(lab.root, 'agent-state');
    await mkdir(join(lab.poolMount, 'kept'), { recursive: true });
    const t = await fx.agent({ url: appl.url, name: 'db1', token: appl.tokens.db1, volumes: [lab.volume], stateDir, retainDir: join(lab.poolMount, 'kept') });
    agent = t.agent;
    keeper = t.provider as RetainingSnapshotProvider;
    configFile = join(lab.root, 'agent.json');
    await writeFile(configFile, JSON.stringify({ appliance: appl.url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes: [lab.volume] }));
    imageA = await backup('full');
  });

  afterAll(() => fx.dispose());

  it('restores a full image onto a new file: byte-identical to the snapshot, zero chunks left as holes', async () => {
    const out = join(lab.poolMount, 'restored-a.raw');
    fx.defer(`remove ${out}`, () => rm(out, { force: true }));
    const r = await restore(imageA.id, out);
    await cmp(out, imageA.snap);
    expect(r).toMatchObject({ imageId: imageA.id, targetKind: 'file', changeSource: 'full', chunksSkipped: 0 });
    expect(r.chunksFetched + r.holes).toBe(r.chunkCount);
    expect(r.chunksFetched).toBe(await nonZeroChunks(imageA.snap));
    expect(r.bytesWritten).toBe(r.chunksFetched * CHUNK);
    // Holes: the file allocates no more than the fetched chunks.
    const st = await stat(out);
    expect(st.blocks * 512).toBeLessThanOrEqual(r.chunksFetched * CHUNK + (1 << 20));
  });

  it('restores onto a loop device: byte-identical, zero chunks punched over old data (holes in the loop\'s file)', async () => {
    const dev = await scratchDevice('dev-target.img', 256 << 20);
    await ddWrite(dev, { bs: 1 << 20, count: 256, source: '/dev/urandom', noTruncate: true }); // old data everywhere
    const r = await restore(imageA.id, dev);
    expect(r.targetKind).toBe('device');
    await cmp(dev, imageA.snap);
    expect(r.bytesZeroed).toBe(r.holes * CHUNK);
    // Zero ranges of 1 MiB and more became holes in the backing file, not written zeros.
    const backing = await stat(join(lab.poolMount, 'dev-target.img'));
    expect(backing.blocks * 512).toBeLessThan((256 << 20) - r.bytesZeroed / 2);
  });

  it('a chunk the appliance corrupts is detected: E_DIGEST_MISMATCH, and the failure says the target state (file not created, device partly restored)', async () => {
    const restores = appl.app.router.restores as unknown as { store: ChunkStore };
    const real = restores.store;
    let flipped = 0;
    // A lying appliance: its store hands out one chunk with a flipped byte (as a valid zstd frame of the wrong bytes).
    const lie = async (d: Buffer) => {
      const plain = Buffer.from(await real.get(d));
      if (plain.length === CHUNK && flipped++ === 5) plain[100] ^= 0xff;
      return plain;
    };
    restores.store = Object.create(real, {
      get: { value: lie },
      getStored: { value: async (d: Buffer) => ({ codec: 1, data: zstdCompress(await lie(d)), plainLength: CHUNK }) },
      // No vectored pack reads: every chunk comes through the lying getStored.
      readStoredv: { value: undefined },
    });
    const out = join(lab.poolMount, 'corrupt.raw');
    try {
      const err = await restore(imageA.id, out).catch((e) => e);
      expect(isBlocksnapError(err, 'E_DIGEST_MISMATCH'), String(err)).toBe(true);
      expect(String(err.message)).toMatch(/SHA-256 of the received data is not the image's digest/);
      expect(String(err.message)).toMatch(/was not created/);
      expect(existsSync(out)).toBe(false);
      // Onto a device the failure says it is partly restored (zero ranges were already punched).
      const dev = await scratchDevice('corrupt-dev.img', 256 << 20);
      flipped = 0;
      const devErr = await restore(imageA.id, dev).catch((e) => e);
      expect(isBlocksnapError(devErr, 'E_DIGEST_MISMATCH'), String(devErr)).toBe(true);
      expect(String(devErr.message)).toMatch(/is partly restored .*run the restore again/);
    } finally {
      restores.store = real;
    }
  });

  it('refuses a mounted target, a too small one, a non-empty file, a loop\'s backing file, a symlink and the volume itself: exit 2, nothing written', async () => {
    const small = await scratchDevice('small.img', 128 << 20);
    await ddWrite(small, { bs: 1 << 20, count: 4, source: '/dev/urandom', noTruncate: true });
    const smallBefore = await sha(small);
    const nonEmpty = join(lab.poolMount, 'non-empty.raw');
    await writeFile(nonEmpty, 'keep me');
    fx.defer(`remove ${nonEmpty}`, () => rm(nonEmpty, { force: true }));
    const cli = (target: string, ...extra: string[]) =>
      execa(process.execPath, [agentCli(), 'restore', imageA.id, '--to', target, '--config', configFile, '--json', ...extra], { reject: false, stdin: 'ignore', timeout: 120_000 });
    const cases: [string, RegExp][] = [
      [lab.volumeDevice, /is mounted at/],
      [small, /smaller than the image/],
      [nonEmpty, /exists and is not empty/],
      [lab.volumeImage, /image file of configured volume vol/],
      [join(lab.poolMount, 'small.img'), /backs loop device/],
      [join(lab.poolMount, 'link.raw'), /symbolic link/],
    ];
    await symlink(join(lab.poolMount, 'missing.raw'), join(lab.poolMount, 'link.raw'));
    fx.defer('remove link.raw', () => rm(join(lab.poolMount, 'link.raw'), { force: true }));
    for (const [target, why] of cases) {
      const r = await cli(target);
      expect(r.exitCode, `${target}: ${String(r.stderr)}`).toBe(2);
      expect(String(r.stderr)).toMatch(/E_USAGE/);
      expect(String(r.stderr)).toMatch(why);
    }
    expect(await sha(small)).toBe(smallBefore);
    expect(await readFile(nonEmpty, 'utf8')).toBe('keep me');
    // Unmounted, the volume is still refused for a full restore: only --changed-only of its own image may write it.
    await execa('umount', [lab.volumeMount]);
    try {
      const r = await cli(lab.volumeDevice);
      expect(r.exitCode).toBe(2);
      expect(String(r.stderr)).toMatch(/only a --changed-only restore/);
    } finally {
      await execa('mount', [lab.volumeDevice, lab.volumeMount]);
    }
  });

  it('the CLI restores with --json and --force (replacing a file)', async () => {
    const out = join(lab.poolMount, 'cli.raw');
    await writeFile(out, 'old');
    fx.defer(`remove ${out}`, () => rm(out, { force: true }));
    const r = await execa(process.execPath, [agentCli(), 'restore', imageA.id, '--to', out, '--force', '--json', '--config', configFile], { reject: false, stdin: 'ignore', timeout: 120_000 });
    expect(r.exitCode, String(r.stderr)).toBe(0);
    const res = JSON.parse(String(r.stdout)) as RestoreResult;
    expect(res).toMatchObject({ imageId: imageA.id, chunksSkipped: 0 });
    expect(res.mbPerSecond).toBeGreaterThan(0);
    await cmp(out, imageA.snap);
  });

  it('changed-only onto the volume itself: the tracker names the candidates, exactly the changed chunks are written, byte-identical', async () => {
    // Writes after image A, then unmount (a mounted volume is refused).
    await ddWrite(join(lab.volumeMount, 'f1'), { bs: CHUNK, count: 3, seek: 5, noTruncate: true });
    await ddWrite(join(lab.volumeMount, 'new-file'), { bs: 1 << 20, count: 2 });
    await execa('umount', [lab.volumeMount]);
    try {
      const changed = await changedChunks(lab.volumeDevice, imageA.snap);
      expect(changed).toBeGreaterThan(0);
      const r = await restore(imageA.id, lab.volumeDevice, { changedOnly: true });
      expect(r, JSON.stringify(r)).toMatchObject({ changeSource: 'tracker', targetKind: 'device' });
      // The tracker's candidates may be more (metadata rewritten with the same bytes); only those that differ are written.
      expect(r.chunksFetched + r.holes).toBe(changed);
      expect(r.chunksCompared).toBeGreaterThanOrEqual(changed);
      expect(r.chunksCompared).toBeLessThan(r.chunkCount / 4);
      expect(r.chunksSkipped).toBe(r.chunkCount - r.chunksFetched - r.holes);
      await cmp(lab.volumeDevice, imageA.snap);
    } finally {
      await execa('mount', [lab.volumeDevice, lab.volumeMount]);
    }
  });

  it('changed-only of an older image: tracker since the last image ∪ digests that differ between the two images', async () => {
    await ddWrite(join(lab.volumeMount, 'f2'), { bs: CHUNK, count: 8, seek: 2, noTruncate: true });
    const imageB = await backup('incremental');
    await ddWrite(join(lab.volumeMount, 'f3'), { bs: CHUNK, count: 4, seek: 1, noTruncate: true });
    await execa('umount', [lab.volumeMount]);
    try {
      const changed = await changedChunks(lab.volumeDevice, imageA.snap);
      const r = await restore(imageA.id, lab.volumeDevice, { changedOnly: true });
      expect(r.changeSource).toBe('tracker');
      expect(r.chunksFetched + r.holes).toBe(changed);
      expect(r.chunksCompared).toBeLessThan(r.chunkCount / 4);
      await cmp(lab.volumeDevice, imageA.snap);
    } finally {
      await execa('mount', [lab.volumeDevice, lab.volumeMount]);
    }
    void imageB;
  });

  it('changed-only onto a copy (not a tracked volume) compares digests and writes exactly the differing chunks', async () => {
    const copy = join(lab.poolMount, 'copy.raw');
    fx.defer(`remove ${copy}`, () => rm(copy, { force: true }));
    await execa('cp', ['--sparse=always', imageA.snap, copy]);
    // 7 chunks of new data where the image has free space (chunks written back as zero) or data.
    await ddWrite(copy, { bs: CHUNK, count: 7, seek: 1000, noTruncate: true });
    const changed = await changedChunks(copy, imageA.snap);
    const r = await restore(imageA.id, copy, { changedOnly: true });
    expect(r).toMatchObject({ changeSource: 'digest-compare', targetKind: 'file' });
    expect(r.chunksFetched + r.holes).toBe(changed);
    await cmp(copy, imageA.snap);
  });
});

/** Chunks whose bytes differ between two files/devices (over the second's size). */
async function changedChunks(a: string, b: string): Promise<number> {
  const size = (await stat(b)).size;
  const fa = await open(a, 'r');
  const fb = await open(b, 'r');
  const ba = Buffer.alloc(CHUNK);
  const bb = Buffer.alloc(CHUNK);
  let n = 0;
  try {
    for (let off = 0; off < size; off += CHUNK) {
      const len = Math.min(CHUNK, size - off);
      await fa.read(ba, 0, len, off);
      await fb.read(bb, 0, len, off);
      if (createHash('sha256').update(ba.subarray(0, len)).digest().compare(createHash('sha256').update(bb.subarray(0, len)).digest()) !== 0) n++;
    }
  } finally {
    await fa.close();
    await fb.close();
  }
  return n;
}

/** Chunks of a file that are not all zero. */
async function nonZeroChunks(file: string): Promise<number> {
  const size = (await stat(file)).size;
  const fh = await open(file, 'r');
  const buf = Buffer.alloc(CHUNK);
  const zero = Buffer.alloc(CHUNK);
  let n = 0;
  try {
    for (let off = 0; off < size; off += CHUNK) {
      const len = Math.min(CHUNK, size - off);
      await fh.read(buf, 0, len, off);
      if (!buf.subarray(0, len).equals(zero.subarray(0, len))) n++;
    }
  } finally {
    await fh.close();
  }
  return n;
}
