import { mkdir, open, readdir, rm, stat } from 'node:fs/promises';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { capture } from '../../agent/capture.js';
import { ReflinkSnapshotProvider, snapshotDirOf } from '../../agent/snapshot/reflink-snapshot-provider.js';
import type { VolumeSpec } from '../../agent/snapshot/snapshot-provider.js';
import { checkTrackerBinding, VolumeIdentityError, type VolumeIdentity } from '../../agent/snapshot/volume-identity.js';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { splitDev } from '../../agent/cbt/device-identity.js';
import { TracefsTracker } from '../../agent/cbt/tracefs/tracefs-tracker.js';
import { VolumeTracking } from '../../agent/cbt/volume-tracking.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { createLoopRig, removeOwnInstances, type LoopRig } from './tracker-fixtures.js';

/**
 * The volume identity proof on real parts: an ext4 volume on a loop device
 * over an image in a real XFS reflink pool (lab A), a second such volume
 * (lab B: another loop device of the same size, another mounted
 * filesystem), a same-size file beside A's image, and a smaller loop device.
 * Each lie in the configuration is refused with E_IDENTITY naming the field,
 * both by the provider's proof and by the per-job capture, which then holds
 * nothing (no snapshot, no frozen filesystem, no tracker switch).
 */
const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });
let a: VolumeLab;
let b: VolumeLab;
let small: LoopRig;
let twin: string;
let provider: ReflinkSnapshotProvider;

async function sparse(file: string, size: number): Promise<void> {
  const fh = await open(file, 'wx', 0o600);
  await fh.truncate(size);
  await fh.close();
}

async function refusal(p: Promise<unknown>): Promise<VolumeIdentityError> {
  const e = await p.then(() => null, (err: unknown) => err);
  expect(e, 'expected E_IDENTITY').toBeInstanceOf(VolumeIdentityError);
  expect(isBlocksnapError(e, 'E_IDENTITY')).toBe(true);
  return e as VolumeIdentityError;
}

/** True if a write to `dir` completes within `ms` (false while its filesystem is frozen). */
function writesWithin(dir: string, ms: number): Promise<boolean> {
  const child = spawn('sh', ['-c', 'printf x > "$1"', 'sh', path.join(dir, 'probe')], { stdio: 'ignore' });
  const done = new Promise<boolean>((resolve) => child.on('exit', (code) => resolve(code === 0)));
  return Promise.race([done, new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);
}

beforeAll(async () => {
  a = await createVolumeLab({ name: 'vol', volumeSize: 256 * MiB });
  b = await createVolumeLab({ name: 'other', volumeSize: 256 * MiB });
  small = await createLoopRig(128 * MiB);
  twin = path.join(a.poolMount, 'twin.img');
  await sparse(twin, 256 * MiB);
  provider = new ReflinkSnapshotProvider({ stateDir: path.join(a.root, 'state'), logger: log, volumes: [a.volume] });
}, 120_000);

afterAll(async () => {
  if (twin) await rm(twin, { force: true });
  await small?.release();
  await b?.destroy();
  await a?.destroy();
});

describe('ReflinkSnapshotProvider.proveIdentity', () => {
  it('proves a true configuration and returns device number, image inode and size', async () => {
    const id = await provider.proveIdentity(a.volume);
    const dev = splitDev((await stat(a.volumeDevice, { bigint: true })).rdev);
    const img = await stat(a.volumeImage, { bigint: true });
    const imgDev = splitDev(img.dev);
    expect(id.device).toMatchObject({ path: a.volumeDevice, major: dev.major, minor: dev.minor, size: 256 * MiB });
    expect(id.device.diskseq).toBeGreaterThan(0);
    expect(id.backing).toEqual({ kind: 'file', path: a.volumeImage, dev: `${imgDev.major}:${imgDev.minor}`, ino: img.ino.toString(), size: 256 * MiB });
    expect(id.mount).toEqual({ path: a.volumeMount, dev: `${dev.major}:${dev.minor}`, fstype: 'ext4' });
  });

  it('refuses an image that is another file of the same size', async () => {
    const e = await refusal(provider.proveIdentity({ ...a.volume, image: twin }));
    expect(e.mismatches.map((m) => m.field)).toEqual(['image']);
    expect(e.mismatches[0]!.configured).toContain(twin);
    expect(e.mismatches[0]!.found).toContain(a.volumeDevice);
    expect(e.message).toMatch(/^volume vol is not one volume: image: configured .*twin\.img.*, found \/dev\/loop\d+ .* is backed by another file/);
  });

  it('refuses a device that is another loop device of the same size, naming device vs image', async () => {
    const e = await refusal(provider.proveIdentity({ ...a.volume, device: b.volumeDevice }));
    // B's loop reads another image, and A's filesystem is not on it.
    expect(e.mismatches.map((m) => m.field)).toEqual(['image', 'mountpoint']);
    expect(e.message).toContain(b.volumeDevice);
    expect(e.message).toContain(a.volumeImage);
  });

  it('refuses a device of another size with the identity error, not a reader error', async () => {
    const e = await refusal(provider.proveIdentity({ ...a.volume, device: small.device }));
    expect(e.mismatches.map((m) => m.field)).toEqual(['image', 'size', 'mountpoint']);
    const size = e.mismatches.find((m) => m.field === 'size')!;
    expect(size.configured).toBe(`image ${a.volumeImage}: ${256 * MiB} bytes`);
    expect(size.found).toContain(`${128 * MiB} bytes`);
    expect(e.message).not.toMatch(/readChunks|words/);
  });

  it('refuses a mountpoint that holds the filesystem of another device', async () => {
    const e = await refusal(provider.proveIdentity({ ...a.volume, mountpoint: b.volumeMount }));
    expect(e.mismatches).toHaveLength(1);
    expect(e.mismatches[0]!.field).toBe('mountpoint');
    expect(e.mismatches[0]!.found).toContain(b.volumeDevice);
  });

  it('refuses a mountpoint that is not a mount point, a missing device, a device that is not a loop', async () => {
    const notMounted = path.join(a.root, 'not-mounted');
    await mkdir(notMounted, { recursive: true });
    expect((await refusal(provider.proveIdentity({ ...a.volume, mountpoint: notMounted }))).mismatches).toEqual([
      { field: 'mountpoint', configured: notMounted, found: 'not a mount point' },
    ]);
    expect((await refusal(provider.proveIdentity({ ...a.volume, device: '/dev/loop-none' }))).mismatches[0]!.field).toBe('device');
    expect((await refusal(provider.proveIdentity({ ...a.volume, device: '/dev/null' }))).message).toContain('not a block device');
    expect((await refusal(provider.proveIdentity({ ...a.volume, image: undefined }))).mismatches[0]!.field).toBe('image');
  });
});

describe('capture: the per-job identity check holds nothing when it refuses', () => {
  let tracking: VolumeTracking | null = null;

  afterEach(async () => {
    await tracking?.close().catch(() => undefined);
    tracking = null;
    await removeOwnInstances();
  });

  async function heldNothing(): Promise<void> {
    expect(await provider.list()).toEqual([]);
    for (const image of [a.volumeImage, b.volumeImage]) {
      expect((await readdir(snapshotDirOf(image)).catch(() => [])).filter((n) => n.includes('.snap'))).toEqual([]);
    }
    for (const mnt of [a.volumeMount, b.volumeMount]) expect(await writesWithin(mnt, 5000), `${mnt} writable (not frozen)`).toBe(true);
  }

  async function track(volume: VolumeSpec): Promise<VolumeTracking> {
    tracking = await VolumeTracking.open(volume, path.join(a.root, `state-${volume.name}-${Date.now()}`), new TracefsTracker(), log);
    return tracking;
  }

  it('a true configuration captures; each lie is refused before any quiesce, freeze or tracker switch', async () => {
    const t = await track(a.volume);
    const ok = await capture({ jobId: 'ok1', volume: a.volume, provider, tracking: t, log });
    expect(ok.switched?.closed.generation).toBe(1);
    await provider.remove(ok.snapshot);
    const generation = t.tracker.generation;

    const lies: Array<[string, VolumeSpec, string]> = [
      ['image', { ...a.volume, image: twin }, 'image'],
      ['device (same size)', { ...a.volume, device: b.volumeDevice }, 'image'],
      ['device (other size)', { ...a.volume, device: small.device }, 'size'],
      ['mountpoint', { ...a.volume, mountpoint: b.volumeMount }, 'mountpoint'],
    ];
    for (const [what, volume, field] of lies) {
      const e = await refusal(capture({ jobId: `lie-${what.replace(/\W+/g, '-')}`, volume, provider, tracking: t, log }));
      expect(e.mismatches.map((m) => m.field), what).toContain(field);
      await heldNothing();
      expect(t.tracker.phase, what).toBe('tracking');
      expect(t.tracker.generation, what).toBe(generation);
    }
    expect(t.validity()).toEqual({ valid: true });
  });

  it('refuses a job whose tracker traces another device than the proven one', async () => {
    // The tracker was started on B's device; the volume is A (as after a config swap on a running agent).
    const t = await track({ ...a.volume, name: 'bound-elsewhere', device: b.volumeDevice });
    const e = await refusal(capture({ jobId: 'wrong-tracker', volume: a.volume, provider, tracking: t, log }));
    expect(e.mismatches).toHaveLength(1);
    expect(e.mismatches[0]).toMatchObject({ field: 'tracker' });
    expect(e.mismatches[0]!.configured).toContain(a.volumeDevice);
    await heldNothing();
    expect(t.tracker.phase).toBe('tracking');
  });
});

describe('checkTrackerBinding (logic)', () => {
  const identity: VolumeIdentity = {
    volume: 'v', device: { path: '/dev/loop9', major: 7, minor: 9, size: 1 << 20, diskseq: 40 },
    backing: { kind: 'file', path: '/p/v.img', dev: '7:1', ino: '12', size: 1 << 20 }, mount: { path: '/m', dev: '7:9', fstype: 'ext4' },
  };
  const tracker = (id: Partial<VolumeIdentity['device']>) => {
    const reasons: string[] = [];
    return { reasons, startInfo: { identity: { major: 7, minor: 9, size: 1 << 20, diskseq: 40, ...id } }, invalidate: (r: string) => reasons.push(r) };
  };

  it('accepts the proven device, refuses another device number', () => {
    const same = tracker({});
    checkTrackerBinding(identity, same);
    expect(same.reasons).toEqual([]);
    expect(() => checkTrackerBinding(identity, tracker({ minor: 10 }))).toThrow(/tracker: configured \/dev\/loop9 \(7:9\), found the change tracker traces 7:10/);
  });

  it('invalidates (does not refuse) a tracker of the same number after a re-attach or resize', () => {
    const reattached = tracker({ diskseq: 39 });
    checkTrackerBinding(identity, reattached);
    expect(reattached.reasons[0]).toMatch(/re-attached since tracking started/);
    const resized = tracker({ size: 1 << 19 });
    checkTrackerBinding(identity, resized);
    expect(resized.reasons[0]).toMatch(/changed size/);
  });
});
